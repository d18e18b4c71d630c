"""A TLS-terminating TCP proxy for tests: serves TLS on 127.0.0.1 (a free port, printed on
stdout once listening) with the given certificate and key, and forwards the decrypted bytes
to TARGET (host:port). Standard library only.

    python3 tls_proxy.py CERT.pem KEY.pem 127.0.0.1:5672
"""
import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


async def handle(client_r, client_w, host, port):
    try:
        up_r, up_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))


async def main():
    cert, key, target = sys.argv[1:4]
    host, port = target.rsplit(":", 1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, host, int(port)), "127.0.0.1", 0, ssl=ctx
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
