/**
 * Runs on the host, inside one sandbox's network namespace only (started through nsenter by
 * netns-listeners.ts): opens the egress proxy's listening sockets there and hands them to the
 * server over the IPC channel, then exits. The sockets stay in the sandbox's namespace; every byte
 * that reaches them is handled by the server, outside the sandbox.
 */
import { execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import net from 'node:net';
import { EGRESS_ADDRESSES } from './netns-addresses.js';

function sh(args: string[]): void {
  try {
    execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const stderr = String((err as { stderr?: Buffer }).stderr ?? '');
    if (!stderr.includes('File exists')) throw new Error(`ip ${args.join(' ')}: ${stderr.trim() || (err as Error).message}`);
  }
}

function listenTcp(host: string, port: number): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ host, port, backlog: 128 }, () => resolve(server));
  });
}

function bindUdp(host: string, port: number): Promise<dgram.Socket> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    socket.once('error', reject);
    socket.bind(port, host, () => resolve(socket));
  });
}

async function main(): Promise<void> {
  const a = EGRESS_ADDRESSES;
  sh(['link', 'set', 'lo', 'up']);
  // The image's resolv.conf names slirp's DNS address: answer there, so the same image serves both modes.
  sh(['addr', 'add', `${a.dnsHost}/32`, 'dev', 'lo']);
  const http = await listenTcp(a.proxyHost, a.httpProxyPort);
  const socks = await listenTcp(a.proxyHost, a.socksPort);
  const dns = await bindUdp(a.dnsHost, 53);
  sh(['route', 'add', 'local', '0.0.0.0/0', 'dev', 'lo']);
  const transparentHttp = await listenTcp('0.0.0.0', a.transparentPorts.http);
  const transparentTls = await listenTcp('0.0.0.0', a.transparentPorts.tls);
  process.send!('http', http);
  process.send!('socks', socks);
  process.send!('dns', dns);
  process.send!('transparentHttp', transparentHttp);
  process.send!('transparentTls', transparentTls);
  // The server disconnects once it holds them all.
  process.once('disconnect', () => process.exit(0));
}

main().catch((err: Error) => {
  process.send!({ error: err.message }, undefined, {}, () => process.exit(1));
});
