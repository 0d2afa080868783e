"""An independent S7 server (python-snap7's pure-Python server) for Nexus's S7 tests.

usage: snap7_server.py PORT

Areas: DB1 (256 bytes), DB10 (64 bytes), DB20 (2000 bytes, byte i holding i % 251), M (64
bytes), I (16 bytes), Q (16 bytes), with the
typed values the Rust tests expect (big-endian, as in a PLC):
DB1.DBD0 real 12.5, DB1.DBW4 int -2, DB1.DBD6 dint -123456, DB1.DBW10 word 65534,
DB1.DBD12 dword 65538, DB1.DBB16 byte 200, DB1.DBX17.3 true, DB1.DBB18 lreal 100.25,
DB1.DBB26 string[10] "PACK-1"; M0.1 true, MW2 int 300; I0.1 true; Q0.0 false.
"""
import struct
import sys
import time

from snap7.server import Server
from snap7.type import SrvArea


def main() -> None:
    port = int(sys.argv[1])
    db1 = bytearray(256)
    struct.pack_into(">f", db1, 0, 12.5)
    struct.pack_into(">h", db1, 4, -2)
    struct.pack_into(">i", db1, 6, -123456)
    struct.pack_into(">H", db1, 10, 65534)
    struct.pack_into(">I", db1, 12, 65538)
    db1[16] = 200
    db1[17] = 0b0000_1000
    struct.pack_into(">d", db1, 18, 100.25)
    db1[26] = 10
    db1[27] = 6
    db1[28:34] = b"PACK-1"
    mk = bytearray(64)
    mk[0] = 0b10
    struct.pack_into(">h", mk, 2, 300)
    pe = bytearray(16)
    pe[0] = 0b10
    pa = bytearray(16)
    db20 = bytearray(i % 251 for i in range(2000))
    server = Server(log=False)
    server.register_area(SrvArea.DB, 1, db1)
    server.register_area(SrvArea.DB, 10, bytearray(64))
    server.register_area(SrvArea.DB, 20, db20)
    server.register_area(SrvArea.MK, 0, mk)
    server.register_area(SrvArea.PE, 0, pe)
    server.register_area(SrvArea.PA, 0, pa)
    server.start_to("127.0.0.1", port)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
