'use strict';
/**
 * A worker for the pipeline engine, in plain Node.js: the whole worker protocol in one file.
 *
 *   const { EngineWorker, pollAgain, RetryableError } = require('./engine-worker');
 *   const worker = new EngineWorker({
 *     target: '127.0.0.1:50051',
 *     components: {
 *       resize: async (inputs, task) => ({ thumbnail: await makeThumbnail(inputs.url, { signal: task.signal }) }),
 *       wait_for_job: {
 *         execute: async (inputs) => pollAgain(5000, { job_id: await submit(inputs) }),
 *         schedule: async (inputs, task) => (await isDone(task.outputs.job_id)) ? { done: true } : pollAgain(5000),
 *       },
 *     },
 *     concurrency: 8,
 *   });
 *   worker.handleSignals();   // SIGTERM / SIGINT: stop polling, let running tasks finish
 *   await worker.run();       // resolves once stopped and drained
 *
 * What it does, following protos/engine/v1/worker.proto:
 * - long-polls WorkerService.PollTasks for the component codes it serves, for as many tasks as it has free
 *   slots, so no more than `concurrency` tasks are ever in flight;
 * - heartbeats every running task at a third of its remaining lease; when a heartbeat answers
 *   cancel_requested (or the token is refused) the task's AbortSignal fires and its result is dropped;
 * - reports CompleteTask (outputs, poll again, await callback) or FailTask (`retryable` when the component
 *   threw an error with `retryable: true`, such as RetryableError);
 * - retries UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED with exponential backoff and jitter, and
 *   drops a result the engine refuses with FAILED_PRECONDITION (a stale token: another attempt owns the node).
 *
 * Only @grpc/grpc-js and @grpc/proto-loader are needed; the .proto files are read at start-up.
 */

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTOS_DIR = path.resolve(__dirname, '..', '..', 'protos');

// Worth retrying with backoff; every other code is final for the call that got it.
const TRANSIENT_CODES = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
]);
// The token no longer owns the task (stale attempt, expired lease, task already over, pipeline purged).
const LOST_CODES = new Set([grpc.status.FAILED_PRECONDITION, grpc.status.NOT_FOUND]);

// A long poll may take this much longer than its wait_ms before the client gives up on the connection.
const POLL_DEADLINE_SLACK_MS = 10_000;
// An engine that answers empty polls at once must not make the loop spin.
const MIN_EMPTY_POLL_MS = 50;
// Heartbeats: never more often than this (a lease this short cannot be kept alive anyway) ...
const MIN_HEARTBEAT_INTERVAL_MS = 200;
// ... `task.heartbeat()` calls are coalesced to at most one per this spacing ...
const MIN_HEARTBEAT_SPACING_MS = 500;
// ... and after a transient heartbeat failure the next try comes this soon.
const HEARTBEAT_RETRY_MS = 1_000;
// A failure message the engine refused as too large is sent again cut to this many characters.
const TRUNCATED_MESSAGE_CHARS = 2_000;

const RESULT = Symbol('engine-worker.result');

// ------------------------------------------------------------------ what components return and throw

/** The work is finished: `outputs` (a JSON object) become the node's outputs. A plain object returned does the same. */
function done(outputs = {}) {
  return { [RESULT]: 'done', outputs };
}

/** Not finished: the engine offers a schedule task after `afterMs` (a polling component). `outputs` are kept. */
function pollAgain(afterMs, outputs = {}) {
  if (!Number.isInteger(afterMs) || afterMs < 1) {
    // The protocol reads 0 as "not polling", which would silently finish the node.
    throw new RangeError(`pollAgain(afterMs): need an integer >= 1, got ${afterMs}`);
  }
  return { [RESULT]: 'poll', afterMs, outputs };
}

/** Not finished: wait for a client Callback, whose data arrives as a schedule task. `outputs` are kept. */
function awaitCallback(outputs = {}) {
  return { [RESULT]: 'callback', outputs };
}

/** Throw it (or any Error with `retryable = true`) for a transient failure: the engine offers the task again. */
class RetryableError extends Error {
  constructor(message, { retryAfterMs = 0 } = {}) {
    super(message);
    this.name = 'RetryableError';
    this.retryable = true;
    this.retryAfterMs = retryAfterMs;
  }
}

/** The reason a task's AbortSignal carries when the engine cancelled it or the lease was lost. */
class TaskCancelled extends Error {
  constructor(message) {
    super(message);
    this.name = 'TaskCancelled';
  }
}

// ------------------------------------------------------------------ small helpers

/** Exponential backoff with "equal jitter": workers that lost the same server do not return in lockstep. */
class Backoff {
  constructor(initialMs, maximumMs) {
    this.initialMs = initialMs;
    this.maximumMs = maximumMs;
    this.stepMs = initialMs;
  }

  next() {
    const step = this.stepMs;
    this.stepMs = Math.min(this.maximumMs, this.stepMs * 2);
    return step / 2 + Math.random() * (step / 2);
  }

  reset() {
    this.stepMs = this.initialMs;
  }
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function describeError(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return `Error: ${String(error)}`;
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function rpcMessage(error) {
  if (!error || error.code === undefined) return describeError(error);
  return `${statusName(error.code)}: ${error.details || error.message}`;
}

/** Paths of integers that a JavaScript number cannot hold exactly (JSON numbers beyond ±2^53). */
function unsafeIntegerPaths(value, at = '') {
  if (typeof value === 'number') {
    return Number.isInteger(value) && !Number.isSafeInteger(value) ? [at || '(value)'] : [];
  }
  if (Array.isArray(value)) return value.flatMap((item, index) => unsafeIntegerPaths(item, `${at}[${index}]`));
  if (isPlainObject(value)) {
    return Object.entries(value).flatMap(([key, item]) => unsafeIntegerPaths(item, at ? `${at}.${key}` : key));
  }
  return [];
}

const LOG_LEVELS = ['debug', 'info', 'warn', 'error'];

function defaultLogger(level) {
  const threshold = LOG_LEVELS.indexOf(level);
  const line = (name) => (...parts) => {
    if (LOG_LEVELS.indexOf(name) < threshold) return;
    const text = parts.map((part) => (typeof part === 'string' ? part : JSON.stringify(part))).join(' ');
    process.stderr.write(`${new Date().toISOString()} ${name.toUpperCase()} engine-worker: ${text}\n`);
  };
  return { debug: line('debug'), info: line('info'), warn: line('warn'), error: line('error') };
}

/** Loads WorkerService from the .proto files; field names stay snake_case as in the contract. */
function loadWorkerService(protosDir = DEFAULT_PROTOS_DIR) {
  const definition = protoLoader.loadSync('engine/v1/worker.proto', {
    includeDirs: [protosDir],
    keepCase: true,
    longs: Number, // int64 fields hold Unix milliseconds and durations: well inside 2^53
    enums: String, // TaskKind arrives as 'TASK_KIND_EXECUTE' / 'TASK_KIND_SCHEDULE'
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).engine.v1.WorkerService;
}

// ------------------------------------------------------------------ one running task

/** Keeps one task's lease alive and turns cancel_requested / a refused token into an abort. */
class LeaseKeeper {
  constructor(worker, message, controller) {
    this.worker = worker;
    this.message = message;
    this.controller = controller;
    this.leaseDeadline = message.lease_deadline_unix_ms || 0;
    this.progressJson = '';
    this.timer = null;
    this.dueAt = Infinity;
    this.sending = false;
    this.wantedSoon = false;
    this.lastSentAt = -Infinity;
    this.stopped = false;
  }

  start() {
    this.schedule(this.interval());
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
  }

  /** A heartbeat soon (coalesced), carrying `progress` when given. */
  request(progress) {
    if (progress !== undefined) this.progressJson = this.worker.json.stringify(progress);
    if (this.stopped) return;
    if (this.sending) {
      this.wantedSoon = true;
      return;
    }
    this.schedule(Math.max(0, this.lastSentAt + MIN_HEARTBEAT_SPACING_MS - Date.now()));
  }

  interval() {
    if (this.worker.heartbeatIntervalMs) return this.worker.heartbeatIntervalMs;
    if (!this.leaseDeadline) return 10_000;
    return Math.max(MIN_HEARTBEAT_INTERVAL_MS, (this.leaseDeadline - Date.now()) / 3);
  }

  schedule(delayMs) {
    if (this.stopped) return;
    const dueAt = Date.now() + delayMs;
    if (this.timer !== null && this.dueAt <= dueAt) return;
    clearTimeout(this.timer);
    this.dueAt = dueAt;
    this.timer = setTimeout(() => this.send(), delayMs);
  }

  async send() {
    this.timer = null;
    this.dueAt = Infinity;
    if (this.stopped) return;
    this.sending = true;
    this.wantedSoon = false;
    this.lastSentAt = Date.now();
    let reply;
    try {
      reply = await this.worker.call(
        'Heartbeat',
        { token: this.message.token, progress_json: this.progressJson },
        this.worker.rpcTimeoutMs,
      );
    } catch (error) {
      this.sending = false;
      if (this.stopped) return;
      if (LOST_CODES.has(error.code)) {
        this.cancel(`lease lost (${rpcMessage(error)})`, 'warn');
      } else {
        const level = TRANSIENT_CODES.has(error.code) ? 'debug' : 'warn';
        this.worker.log[level](`heartbeat for ${describeTask(this.message)} failed: ${rpcMessage(error)}; will retry`);
        this.schedule(Math.min(HEARTBEAT_RETRY_MS, this.interval()));
      }
      return;
    }
    this.sending = false;
    if (this.stopped) return;
    if (reply.cancel_requested) {
      this.cancel(`the engine asked to cancel (${reply.cancel_reason || 'no reason given'})`, 'info');
      return;
    }
    if (reply.lease_deadline_unix_ms) this.leaseDeadline = reply.lease_deadline_unix_ms;
    this.schedule(this.wantedSoon ? MIN_HEARTBEAT_SPACING_MS : this.interval());
  }

  cancel(reason, level) {
    this.stop();
    this.worker.log[level](`${describeTask(this.message)}: ${reason}; stopping it, its result will be dropped`);
    this.controller.abort(new TaskCancelled(reason));
  }
}

function describeTask(message) {
  const { task_id: taskId, component_code: code, pipeline_id: pipelineId, node_id: nodeId } = message;
  return `task ${taskId} (${code}, pipeline ${pipelineId}, node ${nodeId})`;
}

// ------------------------------------------------------------------ the worker

class EngineWorker {
  /**
   * @param {object} options
   * @param {string} options.target the engine's address, "host:port"
   * @param {object} options.components component code -> `async (inputs, task) => outputs | result`, or an
   *   object `{ execute, schedule, version }` (schedule for polling and callback components; `version`, when
   *   given, is the only component version served)
   * @param {number} [options.concurrency=8] most tasks in flight at once, from claim to report
   * @param {string} [options.workerId] shown in the engine's logs and state; "host:pid" by default
   * @param {number} [options.pollWaitMs=20000] how long one long poll waits for work (the server caps it)
   * @param {number} [options.heartbeatIntervalMs] fixed heartbeat interval; default a third of the lease left
   * @param {number} [options.rpcTimeoutMs=10000] deadline of each heartbeat and report call
   * @param {number} [options.reportTimeoutMs=60000] how long a result is retried through transient errors
   * @param {number} [options.maxBackoffMs=10000] longest pause between attempts to reach an unreachable engine
   * @param {number} [options.shutdownGraceMs=30000] how long running tasks may take to finish once stopping
   * @param {grpc.ChannelCredentials} [options.credentials] TLS credentials; plaintext when omitted
   * @param {grpc.Metadata} [options.metadata] sent with every call (for example an authorization header)
   * @param {object} [options.channelOptions] extra grpc-js channel options (they win over the defaults)
   * @param {string} [options.protosDir] folder holding engine/v1/*.proto; default ../../protos
   * @param {{parse: Function, stringify: Function}} [options.json] JSON codec for payloads, e.g. lossless-json
   *   to keep integers beyond 2^53 exact; the built-in JSON by default
   * @param {object} [options.logger] `{debug, info, warn, error}`; lines on stderr by default
   * @param {string} [options.logLevel='info'] for the default logger
   */
  constructor(options) {
    const {
      target,
      components,
      concurrency = 8,
      workerId = `${os.hostname()}:${process.pid}`,
      pollWaitMs = 20_000,
      heartbeatIntervalMs = 0,
      rpcTimeoutMs = 10_000,
      reportTimeoutMs = 60_000,
      maxBackoffMs = 10_000,
      shutdownGraceMs = 30_000,
      credentials = grpc.credentials.createInsecure(),
      metadata = new grpc.Metadata(),
      channelOptions = {},
      protosDir = DEFAULT_PROTOS_DIR,
      json = JSON,
      logger,
      logLevel = 'info',
    } = options;
    if (!target) throw new TypeError('EngineWorker: `target` ("host:port") is required');
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new RangeError(`EngineWorker: concurrency must be an integer >= 1, got ${concurrency}`);
    }
    if (!Number.isInteger(pollWaitMs) || pollWaitMs < 0) {
      throw new RangeError(`EngineWorker: pollWaitMs must be an integer >= 0, got ${pollWaitMs}`);
    }
    if (!logger && !LOG_LEVELS.includes(logLevel)) {
      throw new RangeError(`EngineWorker: logLevel must be one of ${LOG_LEVELS.join(', ')}, got ${logLevel}`);
    }
    this.components = normaliseComponents(components);
    this.codes = [...this.components.keys()].sort();
    this.target = target;
    this.concurrency = concurrency;
    this.workerId = workerId;
    this.pollWaitMs = pollWaitMs;
    this.heartbeatIntervalMs = heartbeatIntervalMs;
    this.rpcTimeoutMs = rpcTimeoutMs;
    this.reportTimeoutMs = reportTimeoutMs;
    this.maxBackoffMs = maxBackoffMs;
    this.shutdownGraceMs = shutdownGraceMs;
    this.metadata = metadata;
    this.json = json;
    this.log = logger || defaultLogger(logLevel);

    const WorkerService = loadWorkerService(protosDir);
    this.client = new WorkerService(target, credentials, {
      // gRPC's own reconnect backoff grows to two minutes; cap it to match ours so a restarted engine is
      // noticed quickly.
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': Math.max(100, maxBackoffMs),
      // One poll may return many tasks of up to --max-payload-bytes (4 MiB) each: no client-side cap.
      'grpc.max_receive_message_length': -1,
      ...channelOptions,
    });

    this.running = new Map(); // token -> { message, controller, promise }
    this.stopping = false;
    this.abandoned = false; // the shutdown grace is over: results are dropped, reports stop retrying
    this.onAbandon = null; // ends drain() early when running tasks are abandoned
    this.pollCall = null;
    this.waiter = null; // the poll loop's current wait (for a free slot, a backoff, a pause between empty polls)
  }

  // ---------------------------------------------------------------- life cycle

  /** Polls and runs tasks until `stop()`; then waits up to `shutdownGraceMs` for running tasks. */
  async run() {
    this.log.info(
      `worker ${this.workerId} serving ${this.codes.join(', ')} from ${this.target} (concurrency ${this.concurrency})`,
    );
    const backoff = new Backoff(100, this.maxBackoffMs);
    let outageSince = null;
    while (!this.stopping) {
      if (this.running.size >= this.concurrency) {
        await this.waitForWakeUp(Infinity, { endsOnFreeSlot: true });
        continue;
      }
      const pollStarted = Date.now();
      let tasks;
      try {
        tasks = await this.poll(this.concurrency - this.running.size);
      } catch (error) {
        if (this.stopping) break;
        if (outageSince === null) {
          outageSince = Date.now();
          const what = TRANSIENT_CODES.has(error.code) ? 'is unreachable' : 'refused the poll';
          this.log[TRANSIENT_CODES.has(error.code) ? 'warn' : 'error'](
            `engine at ${this.target} ${what} (${rpcMessage(error)}); ` +
              `retrying with backoff up to ${this.maxBackoffMs} ms`,
          );
        } else {
          this.log.debug(`polling still failing: ${rpcMessage(error)}`);
        }
        await this.waitForWakeUp(backoff.next());
        continue;
      }
      if (outageSince !== null) {
        this.log.info(`reconnected to ${this.target} after ${((Date.now() - outageSince) / 1000).toFixed(1)} s`);
        outageSince = null;
      }
      backoff.reset();
      if (tasks.length === 0) {
        await this.waitForWakeUp(MIN_EMPTY_POLL_MS - (Date.now() - pollStarted));
        continue;
      }
      // Claimed tasks run even if stopping began meanwhile: they are ours until reported.
      for (const message of tasks) this.startTask(message);
    }
    this.log.info(`worker ${this.workerId} stopping: polling ended, ${this.running.size} task(s) still running`);
    await this.drain();
    this.client.close();
    this.log.info(`worker ${this.workerId} stopped`);
  }

  /** Stops polling; running tasks finish (within `shutdownGraceMs`). Safe to call more than once. */
  stop() {
    this.stopping = true;
    if (this.pollCall) this.pollCall.cancel(); // the engine gives back tasks it claimed for a cancelled poll
    this.wake();
  }

  /** Aborts every running task at once and drops their results (their leases expire; others take them). */
  abandonRunningTasks(reason = 'the worker is shutting down') {
    this.abandoned = true;
    for (const { controller } of this.running.values()) controller.abort(new TaskCancelled(reason));
    if (this.onAbandon) this.onAbandon('abandoned');
  }

  /** SIGTERM / SIGINT stop polling and let running tasks finish; a second signal abandons them. */
  handleSignals(signals = ['SIGTERM', 'SIGINT']) {
    for (const signal of signals) {
      process.on(signal, () => {
        if (this.stopping) {
          this.log.warn(`received ${signal} again: abandoning ${this.running.size} running task(s)`);
          this.abandonRunningTasks(`the worker received ${signal} twice`);
        } else {
          this.log.info(`received ${signal}: finishing ${this.running.size} running task(s), polling no more`);
          this.stop();
        }
      });
    }
  }

  async drain() {
    if (this.running.size === 0) return;
    const settled = Promise.allSettled([...this.running.values()].map((entry) => entry.promise));
    let timer;
    const graceOver = new Promise((resolve) => {
      timer = setTimeout(resolve, this.shutdownGraceMs, 'grace over');
    });
    // A second signal abandons the tasks; a component that ignores its AbortSignal must not hold the exit.
    const abandoned = new Promise((resolve) => {
      this.onAbandon = resolve;
    });
    const outcome = await Promise.race([settled, graceOver, abandoned]);
    clearTimeout(timer);
    if (outcome === 'grace over' && this.running.size > 0) {
      this.log.warn(
        `${this.running.size} task(s) still running after ${this.shutdownGraceMs} ms; abandoning them ` +
          '(the engine offers them again when their leases expire)',
      );
      this.abandonRunningTasks();
    }
  }

  /** Ends the loop's current wait: any wait on stop ('stop'), a wait for a free slot when one frees ('slot'). */
  wake(reason = 'stop') {
    const waiter = this.waiter;
    if (!waiter || (reason === 'slot' && !waiter.endsOnFreeSlot)) return;
    this.waiter = null;
    waiter.finish();
  }

  /** Sleeps up to `ms` (Infinity: until woken); stop() always ends it early, a freed slot only if asked. */
  waitForWakeUp(ms, { endsOnFreeSlot = false } = {}) {
    if (this.stopping || ms <= 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = Number.isFinite(ms) ? setTimeout(() => this.wake(), ms) : null;
      this.waiter = {
        endsOnFreeSlot,
        finish: () => {
          clearTimeout(timer);
          resolve();
        },
      };
    });
  }

  // ---------------------------------------------------------------- calls

  poll(maxTasks) {
    const request = {
      worker_id: this.workerId,
      component_codes: this.codes,
      max_tasks: maxTasks,
      wait_ms: this.pollWaitMs,
    };
    return new Promise((resolve, reject) => {
      this.pollCall = this.client.PollTasks(
        request,
        this.metadata,
        { deadline: Date.now() + this.pollWaitMs + POLL_DEADLINE_SLACK_MS },
        (error, response) => {
          this.pollCall = null;
          if (error) reject(error);
          else resolve(response.tasks);
        },
      );
    });
  }

  /** One unary call with a deadline; rejects with the grpc-js error (it has `.code` and `.details`). */
  call(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this.client[method](request, this.metadata, { deadline: Date.now() + timeoutMs }, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }

  // ---------------------------------------------------------------- running tasks

  startTask(message) {
    const controller = new AbortController();
    const entry = { message, controller, promise: null };
    this.running.set(message.token, entry);
    entry.promise = this.runTask(message, controller)
      .catch((error) => {
        this.log.error(`internal error while handling ${describeTask(message)}: ${describeError(error)}`);
      })
      .finally(() => {
        this.running.delete(message.token);
        this.wake('slot');
      });
  }

  async runTask(message, controller) {
    const isSchedule = message.kind === 'TASK_KIND_SCHEDULE';
    const kind = isSchedule ? 'schedule' : 'execute';
    this.log.debug(`claimed ${describeTask(message)} (attempt ${message.attempt}, ${kind})`);
    const component = this.components.get(message.component_code);
    let refusal = null;
    let task;
    try {
      task = this.taskContext(message, controller.signal, isSchedule);
    } catch (error) {
      refusal = failure(`the task's payload could not be read: ${describeError(error)}`);
    }
    if (!refusal && !component) {
      const code = JSON.stringify(message.component_code);
      refusal = failure(`worker ${this.workerId} has no component ${code}`);
    } else if (!refusal && component.version && component.version !== message.component_version) {
      refusal = failure(
        `worker ${this.workerId} serves ${message.component_code} version ` +
          `${JSON.stringify(component.version)}, not ${JSON.stringify(message.component_version)}`,
      );
    }
    if (refusal) {
      await this.report(message, refusal, controller.signal);
      return;
    }
    const handler = isSchedule ? component.schedule : component.execute;
    if (typeof handler !== 'function') {
      const what = isSchedule ? 'schedule (it was asked to poll again or await a callback)' : 'execute';
      const missing = failure(`component ${message.component_code} has no ${what}`);
      await this.report(message, missing, controller.signal);
      return;
    }
    const unsafe = unsafeIntegerPaths(task.inputs);
    if (unsafe.length > 0) {
      this.log.warn(
        `${describeTask(message)}: inputs ${unsafe.join(', ')} hold integers beyond 2^53, which a JavaScript number ` +
          'cannot hold exactly; pass them as strings or give the worker a lossless `json` codec',
      );
    }
    const lease = new LeaseKeeper(this, message, controller);
    task.heartbeat = (progress) => lease.request(progress);
    lease.start();
    let outcome;
    try {
      outcome = toOutcome(await handler.call(component, task.inputs, task));
    } catch (error) {
      outcome = failureFromError(error);
    } finally {
      lease.stop();
    }
    await this.report(message, outcome, controller.signal);
  }

  taskContext(message, signal, isSchedule) {
    const inputs = parseObject(this.json, message.inputs_json, 'inputs_json');
    return {
      taskId: message.task_id,
      pipelineId: message.pipeline_id,
      nodeId: message.node_id,
      // The node attempt's version: a client passes it to Callback.
      nodeVersion: message.node_version,
      componentCode: message.component_code,
      componentVersion: message.component_version,
      kind: isSchedule ? 'schedule' : 'execute',
      // How many times this task was offered (more than 1 after an expired lease).
      attempt: message.attempt,
      loop: message.loop,
      innerLoop: message.inner_loop,
      // Retries of the node so far (0 on the first attempt; grows with retryable failures and auto_retry).
      retry: message.retry,
      // For schedule tasks: which schedule run this is (1 on the first one after an execute asked to poll again).
      scheduleTimes: message.schedule_times,
      // For a schedule task after a client callback: its data; undefined otherwise.
      callbackData: message.callback_data_json ? this.json.parse(message.callback_data_json) : undefined,
      // Outputs kept by earlier runs of this attempt (pollAgain / awaitCallback).
      outputs: parseObject(this.json, message.outputs_json, 'outputs_json'),
      inputs,
      leaseDeadline: message.lease_deadline_unix_ms ? new Date(message.lease_deadline_unix_ms) : null,
      // Fires when the engine cancels the task (revoked, force-failed, timed out) or the lease is lost.
      signal,
      heartbeat: () => {},
    };
  }

  // ---------------------------------------------------------------- reporting

  async report(message, outcome, signal) {
    if (signal.aborted) {
      this.log.info(`${describeTask(message)} was cancelled (${describeError(signal.reason)}); result dropped`);
      return;
    }
    if (outcome.kind === 'failure') {
      await this.reportFailure(message, outcome);
      return;
    }
    let outputsJson;
    try {
      if (!isPlainObject(outcome.outputs)) throw new TypeError('outputs must be an object of name -> value');
      outputsJson = this.json.stringify(outcome.outputs);
    } catch (error) {
      await this.reportFailure(message, failure(`the outputs are not JSON-serialisable: ${describeError(error)}`));
      return;
    }
    const request = {
      token: message.token,
      outputs_json: outputsJson,
      poll_after_ms: outcome.kind === 'poll' ? outcome.afterMs : 0,
      await_callback: outcome.kind === 'callback',
    };
    try {
      const reply = await this.deliver(message, 'completion', 'CompleteTask', request);
      if (reply) {
        this.log.debug(`reported ${describeTask(message)}: ${outcome.kind}${reply.duplicate ? ' (duplicate)' : ''}`);
      }
    } catch (error) {
      if (error.code !== grpc.status.INVALID_ARGUMENT) throw error;
      await this.reportFailure(message, failure(`the engine refused the outputs: ${error.details}`));
    }
  }

  async reportFailure(message, outcome) {
    this.log.info(`${describeTask(message)} failed${outcome.retryable ? ' (retryable)' : ''}: ${outcome.message}`);
    const send = (text) =>
      this.deliver(message, 'failure', 'FailTask', {
        token: message.token,
        error_message: text,
        retryable: outcome.retryable,
        retry_after_ms: outcome.retryAfterMs,
      });
    try {
      const reply = await send(outcome.message);
      if (reply) this.log.debug(`reported ${describeTask(message)}: failure, will_retry=${reply.will_retry}`);
    } catch (error) {
      if (error.code !== grpc.status.INVALID_ARGUMENT) throw error;
      if (outcome.message.length <= TRUNCATED_MESSAGE_CHARS) {
        this.log.error(`the engine refused the failure of ${describeTask(message)}: ${rpcMessage(error)}; dropped`);
        return;
      }
      try {
        await send(`${outcome.message.slice(0, TRUNCATED_MESSAGE_CHARS)} ... (truncated)`);
      } catch (secondError) {
        const reason = rpcMessage(secondError);
        this.log.error(`the engine refused the failure of ${describeTask(message)}: ${reason}; dropped`);
      }
    }
  }

  /**
   * Sends one report, retrying transient errors with backoff for up to `reportTimeoutMs`. Returns the reply,
   * or null when the result was dropped. Throws INVALID_ARGUMENT (the caller may send something smaller).
   */
  async deliver(message, what, method, request) {
    const deadline = Date.now() + this.reportTimeoutMs;
    const backoff = new Backoff(200, 5_000);
    for (;;) {
      const remaining = deadline - Date.now();
      try {
        return await this.call(method, request, Math.max(100, Math.min(this.rpcTimeoutMs, remaining)));
      } catch (error) {
        if (LOST_CODES.has(error.code)) {
          // Another attempt owns the node now (or the task is over): retrying cannot help.
          this.log.info(`${describeTask(message)}: ${what} refused, result dropped (${rpcMessage(error)})`);
          return null;
        }
        if (error.code === grpc.status.INVALID_ARGUMENT) throw error;
        if (this.abandoned) {
          this.log.warn(`${describeTask(message)}: shutting down, ${what} not sent (${rpcMessage(error)})`);
          return null;
        }
        if (!TRANSIENT_CODES.has(error.code)) {
          this.log.error(`${describeTask(message)}: sending the ${what} failed: ${rpcMessage(error)}; dropped`);
          return null;
        }
        const delay = backoff.next();
        if (Date.now() + delay > deadline) {
          this.log.error(
            `${describeTask(message)}: gave up sending the ${what} after ${this.reportTimeoutMs} ms ` +
              `(${rpcMessage(error)}); the engine offers the task again when its lease expires`,
          );
          return null;
        }
        this.log.warn(`${describeTask(message)}: sending the ${what} failed (${rpcMessage(error)}); retrying`);
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }
}

function normaliseComponents(components) {
  if (!isPlainObject(components) || Object.keys(components).length === 0) {
    throw new TypeError('EngineWorker: `components` must map at least one component code to a function');
  }
  const registry = new Map();
  for (const [code, definition] of Object.entries(components)) {
    const component = typeof definition === 'function' ? { execute: definition } : definition;
    if (!isPlainObject(component) || typeof component.execute !== 'function') {
      throw new TypeError(`EngineWorker: component ${code} needs a function, or an object with execute()`);
    }
    registry.set(code, component);
  }
  return registry;
}

function parseObject(json, text, what) {
  if (!text) return {};
  const value = json.parse(text);
  if (!isPlainObject(value)) throw new TypeError(`${what} must be a JSON object`);
  return value;
}

function failure(message, { retryable = false, retryAfterMs = 0 } = {}) {
  return { kind: 'failure', message, retryable, retryAfterMs };
}

function failureFromError(error) {
  const retryable = Boolean(error && error.retryable);
  const retryAfterMs = retryable && Number.isInteger(error.retryAfterMs) ? Math.max(0, error.retryAfterMs) : 0;
  return failure(describeError(error), { retryable, retryAfterMs });
}

function toOutcome(returned) {
  if (returned === undefined || returned === null) return { kind: 'done', outputs: {} };
  switch (returned[RESULT]) {
    case 'done':
      return { kind: 'done', outputs: returned.outputs };
    case 'poll':
      return { kind: 'poll', afterMs: returned.afterMs, outputs: returned.outputs };
    case 'callback':
      return { kind: 'callback', outputs: returned.outputs };
    default:
      return { kind: 'done', outputs: returned };
  }
}

module.exports = {
  EngineWorker,
  RetryableError,
  TaskCancelled,
  done,
  pollAgain,
  awaitCallback,
  loadWorkerService,
  TRANSIENT_CODES,
};
