#!/usr/bin/env node
// A producer in another language: enqueue creditworker.credits.deduct by speaking
// Celery's message protocol v2 to Redis directly, with no dependency beyond Node itself.
//
//   node deduct.js [--redis redis://127.0.0.1:6379/0] --user alice --amount 5 [--key K] [--wait SECONDS] [--credit-type T]
//   (--redis defaults to CREDITWORKER_BROKER_URL, the workers' broker, Redis database included)
//
// Prints the task id; with --wait, polls the result backend and prints the result JSON.
// Exit codes: 0 ok, 1 the worker refused the operation (error result), 2 timeout or I/O error.
'use strict';
const net = require('net');
const crypto = require('crypto');

// The task and its keyword arguments (below, in main) as the registry has them: DEDUCT and
// DeductCredits in creditworker/contract/operations.py; tests/worker/test_operations.py fails when
// they disagree.
const TASK = 'creditworker.credits.deduct';

function parseArgs(argv) {
  const args = { redis: 'redis://127.0.0.1:6379/0', queue: 'celery' };
  for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
  if (!args.user || !args.amount) throw new Error('usage: --user USER --amount N [--key K] [--wait S]');
  return args;
}

// A minimal RESP client: send one command, read one reply.
class Redis {
  constructor(url) {
    const u = new URL(url);
    this.host = u.hostname || '127.0.0.1';
    this.port = Number(u.port || 6379);
    this.password = u.password ? decodeURIComponent(u.password) : null;
    this.db = Number((u.pathname || '/0').slice(1) || 0);
    this.buffer = Buffer.alloc(0);
    this.waiting = [];
  }
  async connect() {
    this.socket = net.createConnection({ host: this.host, port: this.port });
    await new Promise((resolve, reject) => { this.socket.once('connect', resolve); this.socket.once('error', reject); });
    this.socket.on('data', (chunk) => { this.buffer = Buffer.concat([this.buffer, chunk]); this.drain(); });
    this.socket.on('error', (err) => { for (const w of this.waiting.splice(0)) w.reject(err); });
    if (this.password) await this.command('AUTH', this.password);
    if (this.db) await this.command('SELECT', String(this.db));
  }
  command(...parts) {
    let out = `*${parts.length}\r\n`;
    for (const p of parts) out += `$${Buffer.byteLength(p)}\r\n${p}\r\n`;
    return new Promise((resolve, reject) => { this.waiting.push({ resolve, reject }); this.socket.write(out); });
  }
  drain() {
    while (this.waiting.length) {
      const parsed = this.parse(0);
      if (!parsed) return;
      this.buffer = this.buffer.subarray(parsed.end);
      const w = this.waiting.shift();
      parsed.error ? w.reject(new Error(parsed.error)) : w.resolve(parsed.value);
    }
  }
  parse(at) {
    const eol = this.buffer.indexOf('\r\n', at);
    if (eol < 0) return null;
    const type = String.fromCharCode(this.buffer[at]);
    const line = this.buffer.toString('utf8', at + 1, eol);
    if (type === '+') return { value: line, end: eol + 2 };
    if (type === '-') return { error: line, end: eol + 2 };
    if (type === ':') return { value: Number(line), end: eol + 2 };
    if (type === '$') {
      const length = Number(line);
      if (length < 0) return { value: null, end: eol + 2 };
      if (this.buffer.length < eol + 2 + length + 2) return null;
      return { value: this.buffer.toString('utf8', eol + 2, eol + 2 + length), end: eol + 2 + length + 2 };
    }
    throw new Error(`unsupported RESP reply type ${type}`);
  }
  close() { this.socket.end(); }
}

// The kombu Redis envelope around a Celery protocol v2 message.
function celeryMessage(taskName, kwargs, queue) {
  const id = crypto.randomUUID();
  const body = JSON.stringify([[], kwargs, { callbacks: null, errbacks: null, chain: null, chord: null }]);
  return {
    id,
    envelope: JSON.stringify({
      body: Buffer.from(body, 'utf8').toString('base64'),
      'content-encoding': 'utf-8',
      'content-type': 'application/json',
      headers: {
        lang: 'js', task: taskName, id, root_id: id, parent_id: null, group: null,
        shadow: null, eta: null, expires: null, retries: 0, timelimit: [null, null],
        argsrepr: '()', kwargsrepr: JSON.stringify(kwargs), origin: `node@${require('os').hostname()}`,
        ignore_result: false,
      },
      properties: {
        correlation_id: id, reply_to: '', delivery_mode: 2,
        delivery_info: { exchange: '', routing_key: queue },
        priority: 0, body_encoding: 'base64', delivery_tag: crypto.randomUUID(),
      },
    }),
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const kwargs = { user_id: args.user, amount: Number(args.amount) };
  if (args.key) kwargs.idempotency_key = args.key;
  if (args.description) kwargs.description = args.description;
  if (args['credit-type']) kwargs.credit_type = args['credit-type'];
  // the workers' broker, Redis database included, unless told otherwise
  const redis = new Redis(args.redis || process.env.CREDITWORKER_BROKER_URL || 'redis://127.0.0.1:6379/0');
  await redis.connect();
  const { id, envelope } = celeryMessage(TASK, kwargs, args.queue);
  // kombu consumes with BRPOP, so LPUSH keeps the queue first-in first-out.
  await redis.command('LPUSH', args.queue, envelope);
  console.log(id);
  if (!args.wait) { redis.close(); return 0; }
  const deadline = Date.now() + Number(args.wait) * 1000;
  while (Date.now() < deadline) {
    const stored = await redis.command('GET', `celery-task-meta-${id}`);
    if (stored) {
      const meta = JSON.parse(stored);
      if (meta.status === 'SUCCESS' || meta.status === 'FAILURE') {
        redis.close();
        console.log(JSON.stringify(meta.result));
        return meta.status === 'SUCCESS' && meta.result && meta.result.ok ? 0 : 1;
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  redis.close();
  console.error(`no result for ${id} within ${args.wait} s`);
  return 2;
}

main().then((code) => process.exit(code), (err) => { console.error(String(err.message || err)); process.exit(2); });
