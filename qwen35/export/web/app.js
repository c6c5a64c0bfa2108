// The page: conversation, settings and controls. The model lives in worker.js; this file only renders.
// Each finished reply is also pushed to window.qwen35.results ({ids, text, speeds}) for scripted checks.

const $ = (id) => document.getElementById(id);
const worker = new Worker('worker.js', { type: 'module' });
const history = []; // {role, content[, reasoning_content]} of finished turns (the worker renders past think blocks)
let current = null; // the reply being streamed: {raw, opened, thinkingEl, thinkingText, answerEl}
let readyText = 'ready';
window.qwen35 = { results: [], ready: false, error: null };

function setStatus(text) { $('status').textContent = text; }

function bubble(role) {
  const el = document.createElement('div');
  el.className = `msg ${role}`;
  $('log').appendChild(el);
  return el;
}

// Reasoning sits between <think> and </think> (the prompt may already have opened it): shown folded.
function split(raw, opened) {
  let text = opened ? '<think>' + raw : raw;
  const start = text.indexOf('<think>');
  if (start < 0) return { thinking: '', answer: text };
  const end = text.indexOf('</think>', start);
  if (end < 0) return { thinking: text.slice(start + 7), answer: text.slice(0, start) };
  return { thinking: text.slice(start + 7, end), answer: text.slice(0, start) + text.slice(end + 8) };
}

function render() {
  const { thinking, answer } = split(current.raw, current.opened);
  current.thinkingEl.hidden = thinking.trim() === '';
  current.thinkingText.textContent = thinking.trim();
  current.answerEl.textContent = answer.replace(/^\s+/, '');
  $('log').scrollTop = $('log').scrollHeight;
}

function busy(on) {
  $('send').disabled = on;
  $('stop').disabled = !on;
}

function send() {
  const text = $('prompt').value.trim();
  if (!text || $('send').disabled) return;
  $('prompt').value = '';
  bubble('user').textContent = text;
  history.push({ role: 'user', content: text });
  const system = $('system').value.trim();
  const messages = (system ? [{ role: 'system', content: system }] : []).concat(history);
  const el = bubble('assistant');
  const details = document.createElement('details');
  details.className = 'thinking';
  details.hidden = true;
  const summary = document.createElement('summary');
  summary.textContent = 'Thinking';
  const pre = document.createElement('div');
  details.append(summary, pre);
  const answer = document.createElement('div');
  el.append(details, answer);
  current = { raw: '', opened: false, thinkingEl: details, thinkingText: pre, answerEl: answer };
  busy(true);
  setStatus('thinking…');
  worker.postMessage({
    type: 'generate', messages, thinking: $('thinking').checked,
    maxTokens: Math.max(1, parseInt($('max-tokens').value, 10) || 256),
    temperature: Math.max(0, parseFloat($('temperature').value) || 0),
  });
}

worker.onmessage = (e) => {
  const m = e.data;
  if (m.type === 'status') setStatus(m.text);
  else if (m.type === 'ready') {
    window.qwen35.ready = true;
    window.qwen35.backend = m.backend;
    readyText = `ready: ${m.backend}${m.backend === 'wasm' ? ` (${m.threads} threads)` : ''}, ` +
                `${m.quant} weights ${m.weightsMiB.toFixed(1)} MiB`;
    setStatus(readyText);
    busy(false);
  } else if (m.type === 'delta') {
    current.raw += m.text;
    render();
  } else if (m.type === 'done') {
    current.raw = m.text;
    render();
    const { thinking, answer } = split(m.text, current.opened);
    history.push({ role: 'assistant', content: answer.trim(), reasoning_content: thinking.trim() });
    const reused = m.reusedTokens ? ` (${m.reusedTokens} reused)` : '';
    $('speed').textContent = `prompt ${m.promptTokens} tokens${reused} at ${m.prefillTokS.toFixed(1)} tok/s · ` +
      `${m.ids.length} tokens at ${m.decodeTokS.toFixed(1)} tok/s (${m.finish})`;
    window.qwen35.results.push(m);
    setStatus(readyText);
    busy(false);
  } else if (m.type === 'error') {
    window.qwen35.error = m.text;
    setStatus('error: ' + m.text);
    busy(false);
  }
};

$('form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); }
});
$('stop').addEventListener('click', () => worker.postMessage({ type: 'stop' }));
worker.postMessage({ type: 'load' });
