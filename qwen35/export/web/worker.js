// The model runs here, off the page's thread, so the page stays responsive while tokens are computed.
// It drives the export-onnx graphs exactly as model/manifest.json says: the prompt through the prefill graph
// in chunks, then one token at a time through the decode graph, every present.X fed back as past.X.
// Messages in: {type: 'generate', messages, thinking, maxTokens, temperature} and {type: 'stop'}.
// Messages out: status, ready, start, delta (text), done (ids, text, speeds), error.

const PREFILL_CHUNK = 512; // tokens per prefill call: bounds the attention scores a chunk builds
let ort, tokenizer, template, manifest, sessions, backend;
let stopRequested = false;

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
  sessions = {};
  for (const [name, graph] of Object.entries(manifest.graphs)) {
    postMessage({ type: 'status', text: `compiling ${name} graph…` });
    sessions[name] = await ort.InferenceSession.create('model/' + graph.file, options);
  }
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

async function generate({ messages, thinking, maxTokens, temperature }) {
  stopRequested = false;
  const prompt = template.render({ messages, add_generation_prompt: true, enable_thinking: thinking });
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  // a prompt that ends by opening <think> makes the reply start inside the reasoning
  postMessage({ type: 'start', opened: prompt.trimEnd().endsWith('<think>'), promptTokens: promptIds.length });
  const eos = new Set(manifest.eos_token_ids);
  const t0 = performance.now();
  let cache = emptyCache();
  let logits;
  for (let s = 0; s < promptIds.length; s += PREFILL_CHUNK) {
    ({ logits, cache } = await run('prefill', promptIds.slice(s, s + PREFILL_CHUNK), cache));
  }
  const t1 = performance.now();
  const ids = [];
  let text = '';
  let finish = 'length';
  while (ids.length < maxTokens) {
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
    ({ logits, cache } = await run('decode', [tok], cache));
  }
  const t2 = performance.now();
  const full = tokenizer.decode(ids.filter((t) => !eos.has(t)), { skip_special_tokens: false });
  if (full !== text) postMessage({ type: 'delta', text: full.slice(text.length) });
  postMessage({
    type: 'done', ids, text: full, finish, promptTokens: promptIds.length, prompt,
    prefillTokS: promptIds.length / ((t1 - t0) / 1000),
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
