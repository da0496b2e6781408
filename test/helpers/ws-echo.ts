/** Shared by tests that carry WebSockets to a sandbox's port (ports.test.ts, the cluster test). */
/** A stdlib WebSocket echo server (text frames under 126 bytes), run inside the sandbox. */
export const WS_ECHO = String.raw`
import base64, hashlib, socket, threading
GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
def serve(c):
    data = b''
    while b'\r\n\r\n' not in data:
        data += c.recv(4096)
    head, buf = data.split(b'\r\n\r\n', 1)
    lines = head.decode('latin1').split('\r\n')
    path = lines[0].split(' ')[1]
    key = [l.split(':', 1)[1].strip() for l in lines if l.lower().startswith('sec-websocket-key:')][0]
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    c.sendall(('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
               'Sec-WebSocket-Accept: %s\r\n\r\n' % accept).encode())
    while True:
        while len(buf) < 6 or len(buf) < 6 + (buf[1] & 0x7f):
            more = c.recv(4096)
            if not more:
                return
            buf += more
        n = buf[1] & 0x7f
        mask, payload = buf[2:6], buf[6:6 + n]
        buf = buf[6 + n:]
        text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)).decode()
        out = ('%s %s' % (path, text)).encode()
        c.sendall(bytes([0x81, len(out)]) + out)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 8765))
s.listen()
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
`;
