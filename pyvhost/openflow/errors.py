"""OpenFlow 1.3 ERROR messages: the error types and codes of the spec (1.3.5, section
7.4.4) that pyvhost sends, and ``OFError``, the one exception the codec and the handler
raise for a message the switch refuses. Whoever catches it turns it into an OFPT_ERROR
reply (``OFError.reply``); nothing here touches a socket or the switch."""

from __future__ import annotations

import struct

# enum ofp_error_type
HELLO_FAILED = 0
BAD_REQUEST = 1
BAD_ACTION = 2
BAD_INSTRUCTION = 3
BAD_MATCH = 4
FLOW_MOD_FAILED = 5
GROUP_MOD_FAILED = 6
PORT_MOD_FAILED = 7
TABLE_MOD_FAILED = 8
QUEUE_OP_FAILED = 9
SWITCH_CONFIG_FAILED = 10
ROLE_REQUEST_FAILED = 11
METER_MOD_FAILED = 12
TABLE_FEATURES_FAILED = 13

# ofp_hello_failed_code
HFC_INCOMPATIBLE = 0
HFC_EPERM = 1

# ofp_bad_request_code
BRC_BAD_VERSION = 0
BRC_BAD_TYPE = 1
BRC_BAD_MULTIPART = 2
BRC_BAD_EXPERIMENTER = 3
BRC_BAD_EXP_TYPE = 4
BRC_EPERM = 5
BRC_BAD_LEN = 6
BRC_BUFFER_EMPTY = 7
BRC_BUFFER_UNKNOWN = 8
BRC_BAD_TABLE_ID = 9
BRC_IS_SLAVE = 10
BRC_BAD_PORT = 11
BRC_BAD_PACKET = 12
BRC_MULTIPART_BUFFER_OVERFLOW = 13

# ofp_bad_action_code
BAC_BAD_TYPE = 0
BAC_BAD_LEN = 1
BAC_BAD_EXPERIMENTER = 2
BAC_BAD_EXP_TYPE = 3
BAC_BAD_OUT_PORT = 4
BAC_BAD_ARGUMENT = 5
BAC_EPERM = 6
BAC_TOO_MANY = 7
BAC_BAD_QUEUE = 8
BAC_BAD_OUT_GROUP = 9
BAC_MATCH_INCONSISTENT = 10
BAC_UNSUPPORTED_ORDER = 11
BAC_BAD_TAG = 12
BAC_BAD_SET_TYPE = 13
BAC_BAD_SET_LEN = 14
BAC_BAD_SET_ARGUMENT = 15

# ofp_bad_instruction_code
BIC_UNKNOWN_INST = 0
BIC_UNSUP_INST = 1
BIC_BAD_TABLE_ID = 2
BIC_UNSUP_METADATA = 3
BIC_UNSUP_METADATA_MASK = 4
BIC_BAD_EXPERIMENTER = 5
BIC_BAD_EXP_TYPE = 6
BIC_BAD_LEN = 7
BIC_EPERM = 8

# ofp_bad_match_code
BMC_BAD_TYPE = 0
BMC_BAD_LEN = 1
BMC_BAD_TAG = 2
BMC_BAD_DL_ADDR_MASK = 3
BMC_BAD_NW_ADDR_MASK = 4
BMC_BAD_WILDCARDS = 5
BMC_BAD_FIELD = 6
BMC_BAD_VALUE = 7
BMC_BAD_MASK = 8
BMC_BAD_PREREQ = 9
BMC_DUP_FIELD = 10
BMC_EPERM = 11

# ofp_flow_mod_failed_code
FMFC_UNKNOWN = 0
FMFC_TABLE_FULL = 1
FMFC_BAD_TABLE_ID = 2
FMFC_OVERLAP = 3
FMFC_EPERM = 4
FMFC_BAD_TIMEOUT = 5
FMFC_BAD_COMMAND = 6
FMFC_BAD_FLAGS = 7

# ofp_port_mod_failed_code
PMFC_BAD_PORT = 0
PMFC_BAD_HW_ADDR = 1
PMFC_BAD_CONFIG = 2
PMFC_BAD_ADVERTISE = 3

# ofp_switch_config_failed_code
SCFC_BAD_FLAGS = 0
SCFC_BAD_LEN = 1

# ofp_meter_mod_failed_code
MMFC_UNKNOWN, MMFC_METER_EXISTS, MMFC_INVALID_METER, MMFC_UNKNOWN_METER = 0, 1, 2, 3
MMFC_BAD_COMMAND, MMFC_BAD_FLAGS, MMFC_BAD_RATE, MMFC_BAD_BURST = 4, 5, 6, 7
MMFC_BAD_BAND, MMFC_BAD_BAND_VALUE, MMFC_OUT_OF_METERS, MMFC_OUT_OF_BANDS = 8, 9, 10, 11

# ofp_table_mod_failed_code
TMFC_BAD_TABLE, TMFC_BAD_CONFIG, TMFC_EPERM = 0, 1, 2

TYPE_NAMES = {HELLO_FAILED: "HELLO_FAILED", BAD_REQUEST: "BAD_REQUEST",
              BAD_ACTION: "BAD_ACTION", BAD_INSTRUCTION: "BAD_INSTRUCTION",
              BAD_MATCH: "BAD_MATCH", FLOW_MOD_FAILED: "FLOW_MOD_FAILED",
              SWITCH_CONFIG_FAILED: "SWITCH_CONFIG_FAILED", GROUP_MOD_FAILED: "GROUP_MOD_FAILED",
              PORT_MOD_FAILED: "PORT_MOD_FAILED", ROLE_REQUEST_FAILED: "ROLE_REQUEST_FAILED",
              METER_MOD_FAILED: "METER_MOD_FAILED", TABLE_MOD_FAILED: "TABLE_MOD_FAILED"}
OFPT_ERROR = 1
ERROR_DATA = 64           # bytes of the offending message an error carries (at least 64)


class OFError(Exception):
    """A message the switch refuses: ``type``/``code`` as the spec names them, ``why``
    for the log line (never sent: the ERROR's data is the offending message)."""

    def __init__(self, type_: int, code: int, why: str = ""):
        super().__init__(why or f"{TYPE_NAMES.get(type_, type_)}/{code}")
        self.type = type_
        self.code = code
        self.why = why

    def __str__(self) -> str:
        name = TYPE_NAMES.get(self.type, str(self.type))
        return f"{name} code {self.code}" + (f": {self.why}" if self.why else "")

    def reply(self, version: int, xid: int, request: bytes) -> bytes:
        """The OFPT_ERROR message answering ``request`` (its first 64 bytes as data; for
        HELLO_FAILED an ASCII explanation, as the spec suggests)."""
        data = self.why.encode("ascii", "replace")[:256] if self.type == HELLO_FAILED \
            else request[:ERROR_DATA]
        body = struct.pack("!HH", self.type, self.code) + data
        return struct.pack("!BBHI", version, OFPT_ERROR, 8 + len(body), xid) + body
