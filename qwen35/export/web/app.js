// The page: conversation, settings and controls. The model lives in worker.js; this file only renders.
// Each finished reply is also pushed to window.qwen35.results ({ids, text, speeds}) for scripted checks.

const $ = (id) => document.getElementById(id);
const worker = new Worker('worker.js', { type: 'module' });
const history = []; // {role, content[, reasoning_content]} of finished turns (the worker renders past think blocks)
// the turn under way: {raw, opened, turns (history's length before its user message), text, userEl, bubble,
// thinkingEl, thinkingText, answerEl}; null between turns
let current = null;
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
  $('send').disabled = on || !window.qwen35.ready; // nothing to send to before the model is loaded
  $('stop').disabled = !on;
}

// A turn that gave no reply (an error, or stopped before its first token) leaves the conversation as it was:
// its user message is taken back out of the history (else every later turn would send it again, after no
// answer) and put back in the box to send again; its bubbles stay, marked, with the reason.
function dropTurn(note) {
  history.length = current.turns;
  current.userEl.classList.add('failed');
  current.bubble.classList.add('failed');
  current.answerEl.textContent = note;
  if (!$('prompt').value) $('prompt').value = current.text;
  current = null;
}

function fail(text) {
  window.qwen35.error = text;
  setStatus('error: ' + text);
  if (current) dropTurn('error: ' + text + ' (this message was not kept: send it again)');
  busy(false);
}

// "0" is a number: parseInt(...) || fallback would turn it into the fallback
function number(value, parse, fallback) {
  const x = parse(value);
  return Number.isFinite(x) ? x : fallback;
}

function send() {
  const text = $('prompt').value.trim();
  if (!text || $('send').disabled) return;
  $('prompt').value = '';
  window.qwen35.error = null; // the last turn's
  const userEl = bubble('user');
  userEl.textContent = text;
  const turns = history.length;
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
  current = { raw: '', opened: false, turns, text, userEl, bubble: el, thinkingEl: details, thinkingText: pre,
              answerEl: answer };
  busy(true);
  setStatus('thinking…');
  worker.postMessage({
    type: 'generate', messages, thinking: $('thinking').checked,
    maxTokens: Math.max(1, number($('max-tokens').value, (v) => parseInt(v, 10), 256)),
    temperature: Math.max(0, number($('temperature').value, parseFloat, 0)),
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
  } else if (m.type === 'start') {
    current.opened = m.opened; // the prompt opened <think>: the reply starts inside the reasoning
  } else if (m.type === 'delta') {
    current.raw += m.text;
    render();
  } else if (m.type === 'done') {
    if (m.ids.length === 0) { // stopped while the prompt was read: no reply to keep
      dropTurn('(stopped before the first token; this message was not kept)');
    } else {
      current.raw = m.text;
      render();
      const { thinking, answer } = split(m.text, current.opened);
      history.push({ role: 'assistant', content: answer.trim(), reasoning_content: thinking.trim() });
      current = null;
    }
    const reused = m.reusedTokens ? ` (${m.reusedTokens} reused)` : '';
    $('speed').textContent = `prompt ${m.promptTokens} tokens${reused} at ${m.prefillTokS.toFixed(1)} tok/s · ` +
      `${m.ids.length} tokens at ${m.decodeTokS.toFixed(1)} tok/s (${m.finish})`;
    window.qwen35.results.push(m);
    setStatus(readyText);
    busy(false);
  } else if (m.type === 'error') {
    fail(m.text);
  }
};
// The worker's script did not load or run (a 404, a syntax error): nothing will answer. (A page opened as a
// file does not get this far: index.html says to serve it.)
worker.onerror = (e) => {
  e.preventDefault();
  window.qwen35.ready = false;
  fail(`the model's worker failed to start${e.message ? ': ' + e.message : ' (worker.js did not load)'}`);
};

$('form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); }
});
$('stop').addEventListener('click', () => worker.postMessage({ type: 'stop' }));
worker.postMessage({ type: 'load' });
