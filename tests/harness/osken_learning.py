"""A MAC-learning switch written on os-ken (OpenStack's OpenFlow library), run by the os-ken
venv's Python, never by the project's: ``python osken_learning.py HOST PORT``. On every
switch connection it resyncs (deletes every flow, installs the table-miss rule to
CONTROLLER); on a PACKET_IN it learns the source, installs in_port+eth_dst -> output for a
known destination and sends the frame on with a PACKET_OUT (FLOOD when unknown). One line
on stdout per event, for the test to read."""

import sys

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.lib.packet import ethernet, packet
from os_ken.ofproto import ofproto_v1_3


def say(*words):
    print(*words, flush=True)


class LearningSwitch(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.macs = {}

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def features(self, ev):
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        self.macs[dp.id] = {}
        dp.send_msg(parser.OFPFlowMod(dp, command=ofp.OFPFC_DELETE, table_id=ofp.OFPTT_ALL,
                                      out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                                      match=parser.OFPMatch()))
        actions = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)]
        self.add_flow(dp, 0, parser.OFPMatch(), actions)
        say("CONNECTED", f"{dp.id:016x}")

    def add_flow(self, dp, priority, match, actions):
        ofp, parser = dp.ofproto, dp.ofproto_parser
        inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]
        dp.send_msg(parser.OFPFlowMod(datapath=dp, priority=priority, match=match,
                                      instructions=inst))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        msg = ev.msg
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        in_port = msg.match["in_port"]
        eth = packet.Packet(msg.data).get_protocols(ethernet.ethernet)[0]
        table = self.macs.setdefault(dp.id, {})
        table[eth.src] = in_port
        out_port = table.get(eth.dst, ofp.OFPP_FLOOD)
        actions = [parser.OFPActionOutput(out_port)]
        if out_port != ofp.OFPP_FLOOD:
            self.add_flow(dp, 1, parser.OFPMatch(in_port=in_port, eth_dst=eth.dst), actions)
            say("FLOW", in_port, eth.dst, out_port)
        say("PACKET_IN", msg.reason, in_port, eth.src, eth.dst, len(msg.data))
        dp.send_msg(parser.OFPPacketOut(datapath=dp, buffer_id=ofp.OFP_NO_BUFFER,
                                        in_port=in_port, actions=actions, data=msg.data))


if __name__ == "__main__":
    from os_ken import cfg
    from os_ken.base.app_manager import AppManager
    host, port = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[:1]
    cfg.CONF(args=["--ofp-listen-host", host, "--ofp-tcp-listen-port", port],
             project="os_ken")
    say("LISTENING", host, port)
    AppManager.run_apps([__name__ if __name__ != "__main__" else "osken_learning"])
