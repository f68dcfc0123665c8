"""vhost-user and virtio numbers: message ids, header flags, feature bits.

Pure constants, restated from QEMU's docs/interop/vhost-user.rst and Linux's
include/uapi/linux/virtio_*.h. Nothing here does I/O or imports another pyvhost module.
"""

from enum import IntEnum, IntFlag

HEADER_SIZE = 12
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_FDS = 8  # per message, as libvhost-user and DPDK size their cmsg buffers
MAX_PAYLOAD = 4096  # no request of this protocol carries more
MAX_CONFIG_SIZE = 256
MAX_MEM_TABLE_REGIONS = 8
MAX_MEM_SLOTS = 509
MAX_QUEUE_SIZE = 32768
MAX_RINGS = 256  # KICK/CALL/ERR carry 8 bits of ring index

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
VRING_F_LOG = 0x1


class Request(IntEnum):
    """Front-end -> back-end message ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end -> front-end message ids (on the SET_BACKEND_REQ_FD channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class IotlbType(IntEnum):
    """``type`` of an IOTLB message (IOTLB_MSG and BACKEND_IOTLB_MSG)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


class IotlbPerm(IntEnum):
    """``perm`` of an IOTLB message: what the device may do at that address."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class ProtocolFeature(IntEnum):
    """Bit numbers of VHOST_USER_PROTOCOL_F_*."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class Feature(IntEnum):
    """Bit numbers of the virtio feature word (transport, vhost and virtio-net bits)."""

    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_CTRL_GUEST_OFFLOADS = 2
    NET_MTU = 3
    NET_MAC = 5
    NET_GUEST_TSO4 = 7
    NET_GUEST_TSO6 = 8
    NET_GUEST_ECN = 9
    NET_GUEST_UFO = 10
    NET_HOST_TSO4 = 11
    NET_HOST_TSO6 = 12
    NET_HOST_ECN = 13
    NET_HOST_UFO = 14
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NET_CTRL_VQ = 17
    NET_CTRL_RX = 18
    NET_CTRL_VLAN = 19
    NET_GUEST_ANNOUNCE = 21
    NET_MQ = 22
    NET_CTRL_MAC_ADDR = 23
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35


class DeviceStatus(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


def bit(n: int) -> int:
    """The mask of feature bit number ``n``."""
    return 1 << int(n)


def bits(*numbers: int) -> int:
    """The mask of several feature bit numbers."""
    mask = 0
    for n in numbers:
        mask |= 1 << int(n)
    return mask


def request_name(code: int) -> str:
    """A printable name for a front-end request id, known or not."""
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"
