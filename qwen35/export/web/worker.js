// The model runs here, off the page's thread, so the page stays responsive while tokens are computed.
// It drives the export-onnx prefill graph as model/manifest.json says: the prompt in chunks, then one token at a
// time (one session, so the weights are held once), every present.X fed back as past.X.
// Messages in: {type: 'generate', messages, thinking, maxTokens, temperature} and {type: 'stop'}.
// Messages out: status, ready, start, delta (text), done (ids, text, speeds, reusedTokens), error.
// Multi-turn reuse: the cache after three prefixes of the last turn is kept (the end of its last user message,
// of its prompt, of its answer as fed); the next turn starts from the longest one its prompt begins with and
// prefills only the rest. Past answers are rendered with their think block (preserve_thinking), so the previous
// prompt is a prefix of the next; a template that drops it still reuses everything up to the last user message.
// Stop is seen between prefill chunks as well as between tokens: stopped while the prompt is read, `done` has
// no ids (finish 'cancelled') and what was read is kept, so the same prompt sent again resumes there.

const PREFILL_CHUNK = 512; // tokens per prefill call: bounds the attention scores a chunk builds
let ort, tokenizer, template, manifest, sessions, backend;
let stopRequested = false;
let kept = []; // {ids, cache}: the graphs' cache after exactly these tokens (run() returns fresh tensors)

async function pickBackend() {
  // WebGPU only where the browser has an adapter (headless and older browsers do not): WASM otherwise
  try {
    if (self.navigator && navigator.gpu && (await navigator.gpu.requestAdapter())) return 'webgpu';
  } catch (e) { /* no adapter: WASM */ }
  return 'wasm';
}

async function fetchOk(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r;
}

async function load() {
  backend = await pickBackend();
  ort = await import(backend === 'webgpu' ? './vendor/ort/ort.webgpu.min.mjs' : './vendor/ort/ort.wasm.min.mjs');
  ort.env.wasm.wasmPaths = new URL('./vendor/ort/', self.location.href).href;
  // WASM threads need SharedArrayBuffer, which only a cross-origin-isolated page (COOP/COEP headers) has
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const { Tokenizer } = await import('./vendor/tokenizers.min.mjs');
  const { Template } = await import('./vendor/jinja.js');
  postMessage({ type: 'status', text: 'loading tokenizer…' });
  manifest = await (await fetchOk('model/manifest.json')).json();
  const [tj, tc] = await Promise.all([
    fetchOk('model/' + manifest.tokenizer).then((r) => r.json()),
    fetchOk('model/' + manifest.tokenizer_config).then((r) => r.json()),
  ]);
  tokenizer = new Tokenizer(tj, tc);
  template = new Template(tc.chat_template);
  postMessage({ type: 'status', text: 'loading weights…' });
  // fetched once, handed to both sessions (they share one weights file)
  const data = new Uint8Array(await (await fetchOk('model/' + manifest.external_data)).arrayBuffer());
  const options = {
    executionProviders: backend === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'],
    externalData: [{ path: manifest.external_data, data }],
  };
  // the prefill graph alone: it takes one token as well as the decode graph does (which only leaves out the
  // causal mask), and a second session would hold a second copy of the weights in the WASM heap
  postMessage({ type: 'status', text: 'compiling the graph…' });
  sessions = { prefill: await ort.InferenceSession.create('model/' + manifest.graphs.prefill.file, options) };
  postMessage({ type: 'ready', backend, threads: ort.env.wasm.numThreads, quant: manifest.quant || 'fp32',
                weightsMiB: data.byteLength / 2 ** 20 });
}

function emptyCache() {
  const feeds = {};
  for (const input of manifest.inputs) {
    if (!input.name.startsWith('past.')) continue;
    const dims = input.shape.map((d) => (d === 'batch' ? 1 : d === 'past' ? 0 : d));
    feeds[input.name] = new ort.Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
  }
  return feeds;
}

async function run(graph, ids, cache) {
  const inputIds = new ort.Tensor('int64', BigInt64Array.from(ids, (x) => BigInt(x)), [1, ids.length]);
  const out = await sessions[graph].run({ input_ids: inputIds, ...cache });
  const next = {};
  for (const name of Object.keys(cache)) next[name] = out['present.' + name.slice('past.'.length)];
  return { logits: out.logits.data, cache: next };
}

function pick(logits, temperature) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0)) return best; // greedy: the first maximum, as argmax everywhere else
  let sum = 0;
  const p = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) sum += (p[i] = Math.exp((logits[i] - logits[best]) / temperature));
  let u = Math.random() * sum;
  for (let i = 0; i < p.length; i++) if ((u -= p[i]) <= 0) return i;
  return best;
}

function startsWith(ids, prefix) {
  if (prefix.length > ids.length) return false;
  for (let i = 0; i < prefix.length; i++) if (ids[i] !== prefix[i]) return false;
  return true;
}

async function generate({ messages, thinking, maxTokens, temperature }) {
  stopRequested = false;
  const vars = { messages, enable_thinking: thinking, preserve_thinking: true };
  const prompt = template.render({ ...vars, add_generation_prompt: true });
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  // where the generation prompt (<|im_start|>assistant...) begins: the conversation so far ends there
  const head = tokenizer.encode(template.render({ ...vars, add_generation_prompt: false }),
                                { add_special_tokens: false }).ids;
  const userEnd = head.length < promptIds.length && startsWith(promptIds, head) ? head.length : 0;
  // a prompt that ends by opening <think> makes the reply start inside the reasoning
  postMessage({ type: 'start', opened: prompt.trimEnd().endsWith('<think>'), promptTokens: promptIds.length });
  const eos = new Set(manifest.eos_token_ids);
  const t0 = performance.now();
  // the longest kept prefix of this prompt (at least one token must be left to prefill: its logits)
  let base = null;
  for (const k of kept) {
    if (k.ids.length < promptIds.length && startsWith(promptIds, k.ids) && (!base || k.ids.length > base.ids.length)) base = k;
  }
  const reused = base ? base.ids.length : 0;
  let cache = base ? base.cache : emptyCache();
  let logits;
  const next = []; // what this turn leaves for the next one
  let pos = reused;
  let finish = 'length';
  for (const end of [userEnd, promptIds.length]) {
    while (pos < end && finish !== 'cancelled') {
      const to = Math.min(end, pos + PREFILL_CHUNK);
      ({ logits, cache } = await run('prefill', promptIds.slice(pos, to), cache));
      pos = to;
      if (pos === promptIds.length) break;
      await new Promise((r) => setTimeout(r, 0)); // let a stop message in between chunks too
      if (stopRequested) finish = 'cancelled';
    }
    // what was read is kept (a stopped prompt sent again resumes there)
    const held = next.length ? next[next.length - 1].ids.length : reused;
    if (pos > held) next.push({ ids: promptIds.slice(0, pos), cache });
    if (finish === 'cancelled') break;
  }
  const t1 = performance.now();
  const ids = [];
  let text = '';
  while (finish !== 'cancelled' && ids.length < maxTokens) {
    const tok = pick(logits, temperature);
    ids.push(tok);
    if (eos.has(tok)) { finish = 'stop'; break; }
    const full = tokenizer.decode(ids, { skip_special_tokens: false });
    if (!full.endsWith('\uFFFD')) { // an incomplete UTF-8 sequence waits for its next token
      postMessage({ type: 'delta', text: full.slice(text.length) });
      text = full;
    }
    if (ids.length === maxTokens) break;
    await new Promise((r) => setTimeout(r, 0)); // let a stop message in
    if (stopRequested) { finish = 'cancelled'; break; }
    ({ logits, cache } = await run('prefill', [tok], cache));
  }
  const t2 = performance.now();
  // every generated token but the last was fed: the cache now holds exactly these
  if (ids.length > 1) next.push({ ids: promptIds.concat(ids.slice(0, -1)), cache });
  kept = next.length ? next : kept;
  const shown = ids.filter((t) => !eos.has(t)); // none: stopped before a token, or an EOS first
  const full = shown.length ? tokenizer.decode(shown, { skip_special_tokens: false }) : ''; // (decode refuses [])
  if (full !== text) postMessage({ type: 'delta', text: full.slice(text.length) });
  postMessage({
    type: 'done', ids, text: full, finish, promptTokens: promptIds.length, reusedTokens: reused, prompt,
    prefillTokS: (pos - reused) / ((t1 - t0) / 1000),
    decodeTokS: ids.length > 1 ? (ids.length - 1) / ((t2 - t1) / 1000) : 0,
  });
}

let ready = null;
self.onmessage = async (e) => {
  const msg = e.data;
  if (msg.type === 'stop') { stopRequested = true; return; }
  try {
    if (msg.type === 'load') ready = ready || load();
    await ready;
    if (msg.type === 'generate') await generate(msg);
  } catch (err) {
    postMessage({ type: 'error', text: String(err && err.message ? err.message : err) });
  }
};
