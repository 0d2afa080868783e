"""An independent Modbus TCP server (pymodbus) for Nexus's gateway tests.

usage: pymodbus_server.py PORT [tcp|rtu]

Holds the same typed values as the gateway's Rust tests (protocol addresses):
HR 200-241 typed registers, HR 10 setpoint, CO 7 and DI 9 set, IR 3 = 4242.
With `rtu` the server speaks RTU framing (with CRC) over TCP.
"""
import asyncio
import sys

from pymodbus import FramerType
from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartAsyncTcpServer

HOLDING = {
    200: [0x42F6, 0xE979],  # float32 123.456 ABCD
    202: [0x79E9, 0xF642],  # DCBA
    204: [0xF642, 0x79E9],  # BADC
    206: [0xE979, 0x42F6],  # CDAB
    210: [0xFFFE],  # int16 -2
    211: [0xFFFE],  # uint16 65534
    212: [0x1DC0, 0xFFFE],  # int32 -123456 CDAB
    214: [0x0001, 0x0002],  # uint32 65538
    216: [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFD],  # int64 -3
    220: [0x0807, 0x0605, 0x0403, 0x0201],  # uint64 0x0102030405060708 DCBA
    224: [0x4059, 0, 0, 0],  # float64 100.0
    230: [0x5041, 0x434B, 0x2D31, 0],  # "PACK-1"
    240: [0b1000],  # bit 3
    241: [250],  # int16 250 (scaled 0.1, offset -10 -> 15.0)
    10: [500],
}


def main() -> None:
    port = int(sys.argv[1])
    framer = FramerType.RTU if len(sys.argv) > 2 and sys.argv[2] == "rtu" else FramerType.SOCKET
    hr = [0] * 400
    for addr, words in HOLDING.items():
        hr[addr : addr + len(words)] = words
    coils = [False] * 20
    coils[7] = True
    di = [False] * 20
    di[9] = True
    ir = [0] * 10
    ir[3] = 4242
    # pymodbus blocks are one-based: a block starting at 1 maps protocol address 0.
    device = ModbusDeviceContext(
        hr=ModbusSequentialDataBlock(1, hr),
        co=ModbusSequentialDataBlock(1, coils),
        di=ModbusSequentialDataBlock(1, di),
        ir=ModbusSequentialDataBlock(1, ir),
    )
    context = ModbusServerContext(devices=device, single=True)
    asyncio.run(StartAsyncTcpServer(context=context, address=("127.0.0.1", port), framer=framer))


if __name__ == "__main__":
    main()
