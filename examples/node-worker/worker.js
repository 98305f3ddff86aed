'use strict';
/**
 * A Node.js worker serving four example components (the protocol itself lives in engine-worker.js):
 *
 *   node_transform  one-shot: echoes `value` and adds values made in JavaScript, so tests can check that
 *                   strings, numbers, booleans, null, nested objects/arrays and unicode cross both ways
 *   node_flaky      fails with a retryable error until the node's retry counter reaches `fail_times`, then
 *                   succeeds; with `fail_permanently: true` it fails for good (not retryable)
 *   node_poll       polling: asks to be polled again `polls` times (every `interval_ms`), then completes
 *   node_sleep      sleeps `seconds`, stopping early when the engine cancels the task (revoke, force-fail)
 *
 *   node worker.js --target 127.0.0.1:50051 --concurrency 8      (or ENGINE_TARGET=host:port node worker.js)
 */

const { parseArgs } = require('node:util');
const { EngineWorker, RetryableError, pollAgain } = require('./engine-worker');

// The type of every leaf of a JSON value as this worker will write it back. JavaScript has one number type:
// a number is an integer for the other side when JSON.stringify writes it with no fraction or exponent.
function describeTypes(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return value.map(describeTypes);
  if (typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, describeTypes(item)]));
  }
  if (typeof value === 'number') return /^-?\d+$/.test(JSON.stringify(value)) ? 'integer' : 'float';
  return typeof value; // 'string' | 'boolean'
}

const MADE_IN_NODE = Object.freeze({
  text: 'héllo 世界 🚀 from Node.js',
  integer: 9_007_199_254_740_991, // Number.MAX_SAFE_INTEGER: the largest integer a JS number holds exactly
  float: 0.1 + 0.2, // 0.30000000000000004 on both sides: JSON carries the shortest exact digits
  negative: -42,
  yes: true,
  no: false,
  nothing: null,
  nested: { list: [1, 'two', 3.5, false, null, { deep: ['ü'] }], empty_object: {}, empty_list: [] },
});

const components = {
  /**
   * Echoes `value` (and `extra`, when given) with the types JavaScript saw; counts `hops` and appends to
   * `trail`, so a chain of workers in several languages can be followed.
   */
  node_transform(inputs) {
    const { value = null, hops = 0, trail = [] } = inputs;
    const outputs = {
      echo: value,
      types: describeTypes(value),
      hops: hops + 1,
      trail: [...trail, 'node'],
      made_in_node: MADE_IN_NODE,
    };
    if ('extra' in inputs) Object.assign(outputs, { extra: inputs.extra, extra_types: describeTypes(inputs.extra) });
    return outputs;
  },

  /** Transient failures first, then success; or a permanent failure on demand. */
  node_flaky(inputs, task) {
    const { fail_times: failTimes = 2, retry_after_ms: retryAfterMs = 100 } = inputs;
    const permanent = inputs.fail_permanently === true;
    if (permanent) {
      throw new Error(inputs.message || `node_flaky was asked to fail for good (retry ${task.retry})`);
    }
    if (task.retry < failTimes) {
      throw new RetryableError(`node_flaky: transient failure on retry ${task.retry}`, { retryAfterMs });
    }
    return { succeeded_on_retry: task.retry, attempt: task.attempt };
  },

  /** Polls `polls` times: execute starts the "job", schedule checks on it until it is done. */
  node_poll: {
    execute(inputs) {
      return pollAgain(inputs.interval_ms ?? 100, { started_at: Date.now(), checks: [] });
    },
    schedule(inputs, task) {
      const checks = [...(task.outputs.checks || []), task.scheduleTimes];
      if (task.scheduleTimes >= (inputs.polls ?? 3)) {
        return { polls: task.scheduleTimes, checks, took_ms: Date.now() - task.outputs.started_at };
      }
      return pollAgain(inputs.interval_ms ?? 100, { checks });
    },
  },

  /** Sleeps, watching the task's AbortSignal: a revoke or force-fail stops it within one heartbeat. */
  async node_sleep(inputs, task) {
    const seconds = inputs.seconds ?? 1;
    const started = Date.now();
    console.log(`node_sleep: node ${task.nodeId} started, sleeping ${seconds} s`);
    try {
      await new Promise((resolve, reject) => {
        task.signal.throwIfAborted();
        const timer = setTimeout(resolve, seconds * 1000);
        task.signal.addEventListener(
          'abort',
          () => {
            clearTimeout(timer);
            reject(task.signal.reason);
          },
          { once: true },
        );
      });
    } catch (error) {
      const after = ((Date.now() - started) / 1000).toFixed(1);
      console.log(`node_sleep: node ${task.nodeId} stopped after ${after} s: ${error.message}`);
      throw error; // the worker drops the result of a cancelled task anyway
    }
    return { slept: seconds };
  },
};

const OPTIONS = {
  target: { type: 'string', default: process.env.ENGINE_TARGET || '127.0.0.1:50051' },
  concurrency: { type: 'string', default: '8' },
  'worker-id': { type: 'string' },
  'poll-wait-ms': { type: 'string', default: '20000' },
  'log-level': { type: 'string', default: 'info' },
  help: { type: 'boolean', short: 'h', default: false },
};

const USAGE =
  'usage: node worker.js [--target HOST:PORT] [--concurrency N] [--worker-id ID] [--poll-wait-ms MS] ' +
  '[--log-level debug|info|warn|error]\n' +
  `serves: ${Object.keys(components).join(', ')}; the target defaults to $ENGINE_TARGET or 127.0.0.1:50051`;

function exitWithUsageError(error) {
  console.error(`worker.js: ${error.message}\n${USAGE}`);
  process.exit(2);
}

function main() {
  let options;
  try {
    options = parseArgs({ options: OPTIONS }).values;
  } catch (error) {
    exitWithUsageError(error);
  }
  if (options.help) {
    console.log(USAGE);
    return;
  }
  let worker;
  try {
    worker = new EngineWorker({
      target: options.target,
      components,
      concurrency: Number(options.concurrency),
      workerId: options['worker-id'],
      pollWaitMs: Number(options['poll-wait-ms']),
      logLevel: options['log-level'],
    });
  } catch (error) {
    exitWithUsageError(error);
  }
  worker.handleSignals();
  worker.run().then(
    () => process.exit(0),
    (error) => {
      console.error(error);
      process.exit(1);
    },
  );
}

if (require.main === module) main();

module.exports = { components, describeTypes };
