"""An independent OPC UA server (Python asyncua, from PyPI) for Nexus's OPC UA tests.

usage: asyncua_server.py PORT PKI_DIR

Endpoints: None, and Basic256Sha256 with SignAndEncrypt (a self-signed certificate is made in
PKI_DIR at first start). Namespace "urn:nexus:asyncua-peer", object "Line" with:
Counter (UInt32, +1 every 100 ms), Temperature (Double, moving), Setpoint (Double, writable,
42.5), Mode (Int16, writable, 1), Name (String, writable, "peer").
"""
import asyncio
import sys
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.truststore import TrustStore  # noqa: F401  (import check)
from cryptography.x509.oid import ExtendedKeyUsageOID


async def main() -> None:
    port = int(sys.argv[1])
    pki = Path(sys.argv[2])
    pki.mkdir(parents=True, exist_ok=True)
    cert, key = pki / "server-cert.der", pki / "server-key.pem"
    uri = "urn:nexus:asyncua-peer:server"
    await setup_self_signed_certificate(
        key, cert, uri, "127.0.0.1",
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        {"countryName": "BE", "organizationName": "Nexus tests", "commonName": "asyncua peer"},
    )
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    await server.set_application_uri(uri)
    server.set_security_policy([
        ua.SecurityPolicyType.NoSecurity,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ])
    await server.load_certificate(str(cert))
    await server.load_private_key(str(key))
    idx = await server.register_namespace("urn:nexus:asyncua-peer")
    line = await server.nodes.objects.add_object(idx, "Line")
    counter = await line.add_variable(ua.NodeId("Counter", idx), "Counter", ua.Variant(0, ua.VariantType.UInt32))
    temp = await line.add_variable(ua.NodeId("Temperature", idx), "Temperature", 20.0)
    sp = await line.add_variable(ua.NodeId("Setpoint", idx), "Setpoint", 42.5)
    mode = await line.add_variable(ua.NodeId("Mode", idx), "Mode", ua.Variant(1, ua.VariantType.Int16))
    name = await line.add_variable(ua.NodeId("Name", idx), "Name", "peer")
    for v in (sp, mode, name):
        await v.set_writable()
    async with server:
        n = 0
        while True:
            await asyncio.sleep(0.1)
            n += 1
            await counter.write_value(ua.Variant(n, ua.VariantType.UInt32))
            await temp.write_value(20.0 + (n % 50) / 10.0)


if __name__ == "__main__":
    asyncio.run(main())
