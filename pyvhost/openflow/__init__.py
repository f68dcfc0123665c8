"""pyvhost.openflow: the switch as an OpenFlow 1.3 endpoint that ovs-ofctl and controllers
drive unmodified. Layers, each its own module (dependencies point down):

- ``errors``: error types/codes and ``OFError`` (one exception, one ERROR reply);
- ``codec``: header, message types, HELLO/ECHO/FEATURES/CONFIG;
- ``oxm``: OXM matches <-> the rule model's match dict;
- ``actions``: instructions and actions <-> the rule model's actions;
- ``multipart``: MULTIPART request bodies and reply layouts;
- ``asyncmsg``: PACKET_IN, FLOW_REMOVED, PORT_STATUS layouts and the PACKET_OUT parser;
- ``roles``: ROLE_REQUEST (generation ids) and GET/SET_ASYNC per connection;
- ``groupmod``: GROUP_MOD and the group multiparts over pyvhost.switch.groups;
- ``handler``: one bridge's requests applied through the Switch's own methods;
- ``connection``: one asyncio connection (HELLO, framing, echo, inactivity probe);
- ``events``: PACKET_INs from the datapath's controller queue, PORT_STATUS, FLOW_REMOVED,
  the PACKET_OUT injector;
- ``manager``: per bridge targets (tcp: with reconnect, ptcp:, punix:), fail mode, dpid,
  groups, persistence in the store;
- ``commands``: set-controller, del-controller, set-dpid, set-fail-mode for ``pyvhost ctl``.

May import pyvhost.switch (its rule model and Switch methods) and the compiled flow
constants; the switch and the datapath import nothing from here. ``enable(switch)``
attaches it to a switch and registers its commands.
"""

from __future__ import annotations

from .manager import OpenFlow, enable

__all__ = ["OpenFlow", "enable"]
