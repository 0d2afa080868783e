"""A Sparkplug B host application on pysparkplug, independent of Nexus's codec.

Usage: sparkplug_host.py HOST PORT USER PASSWORD GROUP NODE

Subscribes to spBv1.0/GROUP/#, decodes every message with pysparkplug (data metrics resolved
to their names through the births it saw, as a host does), and prints one JSON line per
message: {"type", "device", "seq", "metrics": [{"name", "alias", "datatype", "value",
"historical"}]}. Reads commands from stdin, one per line:
  rebirth                   -> publish NCMD Node Control/Rebirth = true to NODE
  dcmd DEVICE METRIC VALUE  -> publish DCMD to NODE/DEVICE setting METRIC (by the alias and
                               datatype of the last DBIRTH, as a host does) to the integer VALUE
  quit                      -> disconnect and exit
"""

import json
import sys
import threading

import pysparkplug as psp


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def metric_json(m):
    value = m.value
    if isinstance(value, bytes):
        value = value.hex()
    return {
        "name": m.name,
        "alias": m.alias,
        "datatype": m.datatype.name,
        "value": value,
        "historical": bool(m.is_historical),
    }


def main():
    host, port, user, password, group, node = sys.argv[1:7]
    client = psp.Client(client_id=f"pysparkplug-host-{node}", username=user, password=password)
    connected = threading.Event()
    births = {}  # device -> {metric name: (alias, datatype)}

    def on_message(_client, message):
        payload = message.payload
        if str(message.topic.message_type) == "DBIRTH":
            births[message.topic.device_id] = {m.name: (m.alias, m.datatype) for m in payload.metrics}
        metrics = []
        if hasattr(payload, "metrics"):
            metrics = [metric_json(m) for m in payload.metrics]
        elif hasattr(payload, "bd_seq_metric"):
            metrics = [metric_json(payload.bd_seq_metric)]
        out(
            {
                "type": str(message.topic.message_type),
                "device": message.topic.device_id,
                "seq": getattr(payload, "seq", None),
                "metrics": metrics,
            }
        )

    def on_connect(_client):
        connected.set()

    client.subscribe(psp.Topic(group_id=group, message_type=psp.MULTI_LEVEL_WILDCARD), psp.QoS.AT_LEAST_ONCE, on_message)
    client.connect(host, port=int(port), blocking=False, callback=on_connect)
    if not connected.wait(10):
        out({"error": "not connected within 10 s"})
        return 1
    out({"ready": True})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rebirth":
            ncmd = psp.NCmd(
                timestamp=psp.get_current_timestamp(),
                metrics=(
                    psp.Metric(
                        timestamp=psp.get_current_timestamp(),
                        name="Node Control/Rebirth",
                        datatype=psp.DataType.BOOLEAN,
                        value=True,
                    ),
                ),
            )
            topic = psp.Topic(message_type=psp.MessageType.NCMD, group_id=group, edge_node_id=node)
            client.publish(psp.Message(topic=topic, payload=ncmd, qos=psp.QoS.AT_LEAST_ONCE, retain=False))
        elif cmd.startswith("dcmd "):
            _, device, name, value = cmd.split(" ", 3)
            alias, datatype = births[device][name]
            dcmd = psp.DCmd(
                timestamp=psp.get_current_timestamp(),
                metrics=(
                    psp.Metric(
                        timestamp=psp.get_current_timestamp(),
                        name=None,
                        alias=alias,
                        datatype=datatype,
                        value=int(value),
                    ),
                ),
            )
            topic = psp.Topic(message_type=psp.MessageType.DCMD, group_id=group, edge_node_id=node, device_id=device)
            client.publish(psp.Message(topic=topic, payload=dcmd, qos=psp.QoS.AT_LEAST_ONCE, retain=False))
        elif cmd == "quit":
            break
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
