import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Client, Sandbox } from 'podflare';
import { loadConfig, startServer } from '@podflare/server';
const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-bench-'));
const config = loadConfig({ port: 0, logLevel: 'warn', imagesDir: '/var/lib/podflare/images', stateDir, poolSize: 5 }, { ...process.env, PODFLARE_API_KEYS: '' });
const server = await startServer(config);
const client = new Client({ host: server.url });
await server.manager.waitPoolFull(60000);
const t = async <T>(label: string, f: () => Promise<T>): Promise<T> => { const t0 = performance.now(); const r = await f(); console.log(label, (performance.now() - t0).toFixed(1), 'ms'); return r; };
const p = await Sandbox.create({ client });
for (const code of [
  "import numpy as np, pandas as pd, os\npd.DataFrame(np.random.rand(600_000, 10)).to_csv('/root/data.csv')\nprint(os.path.getsize('/root/data.csv'))",
  "pd.DataFrame(np.random.rand(250_000, 10)).to_csv('/root/data.csv')\nprint(os.path.getsize('/root/data.csv'))",
  "pd.DataFrame(np.random.rand(600_000, 10)).to_csv('/root/data.csv', float_format='%.6f')\nprint(os.path.getsize('/root/data.csv'))",
]) { const r = await t('csv', () => p.runCode(code)); console.log(r.stdout, r.error); }
const r2 = await t('read', () => p.runCode("import time; t=time.perf_counter(); df = pd.read_csv('/root/data.csv'); print(df.shape, time.perf_counter()-t)"));
console.log(r2.stdout, r2.error);
const r3 = await t('fresh import+read', async () => { const s = await Sandbox.create({ client }); const bytes = await t('download', async () => { const st = await p.downloadStream('/root/data.csv'); const chunks: Buffer[] = []; for await (const c of st) chunks.push(c as Buffer); return Buffer.concat(chunks); }); await t('upload', () => s.upload('/root/data.csv', bytes)); const r = await t('setup', () => s.runCode("import pandas as pd\ndf = pd.read_csv('/root/data.csv')\nprint(df.shape)")); await s.close(); return r; });
console.log(r3.stdout, r3.error);
for (let i = 0; i < 3; i++) { const kids = await t('fork5 with csv', () => p.fork(5)); await Promise.all(kids.map((k) => k.close())); await new Promise((r) => setTimeout(r, 300)); }
// 1 GB
const big = await Sandbox.create({ client });
console.log((await t('1GB', () => big.runCode('import numpy as np\na = np.ones(128*1024*1024)\nprint(a.nbytes)'))).stdout);
for (let i = 0; i < 5; i++) { const kids = await t('fork1 1GB', () => big.fork(1)); await Promise.all(kids.map((k) => k.close())); await new Promise((r) => setTimeout(r, 300)); }
const ten = await Sandbox.create({ client });
console.log((await t('10MB', () => ten.runCode('import numpy as np\na = np.ones(10*1024*1024//8)\nprint(a.nbytes)'))).stdout);
for (let i = 0; i < 5; i++) { const kids = await t('fork1 10MB', () => ten.fork(1)); await Promise.all(kids.map((k) => k.close())); await new Promise((r) => setTimeout(r, 300)); }
// diff
const [a, b] = await ten.fork(2);
for (const [s, tag] of [[a, 'A'], [b, 'B']] as const) console.log((await t('write1000', () => s!.runCode(`import os\nos.makedirs('/root/out', exist_ok=True)\nfor i in range(1000):\n    open(f'/root/out/f{i:04d}.txt','w').write('${tag} %d\\n' % i)`))).error);
for (let i = 0; i < 5; i++) { const d = await t('diff', () => a!.diff(b!)); console.log(d.added.length, d.removed.length, d.modified.length); }
await Promise.all([a!.close(), b!.close(), p.close(), big.close(), ten.close()]);
client.close();
await server.close();
await rm(stateDir, { recursive: true, force: true });
