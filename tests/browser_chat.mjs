// Drives the `qwen35 web` page in headless Chromium (tests/test_web.py): types a prompt, waits for the reply,
// saves a screenshot and prints one JSON line: {ids, text, prefillTokS, decodeTokS, backend, ...}; with a second
// prompt it then sends that one too (a second turn) and adds its reply as `second`; with a third it sends that
// one and presses Stop at once (`stopped`: a long prompt is stopped while it is read, before any token).
// usage: node browser_chat.mjs PLAYWRIGHT_CORE_DIR URL PROMPT MAX_TOKENS SCREENSHOT [SECOND [STOPPED]]
//
// --scripted: the page alone (app.js, no model): node browser_chat.mjs PLAYWRIGHT_CORE_DIR URL --scripted FILE_URL
// URL serves the page's files without worker.js. A stand-in Worker records what app.js sends and answers with
// the messages worker.js posts (a prompt that opens <think>, an error, a stop before the first token); then the
// page with the real Worker (worker.js missing: it fails to load), and the page opened as FILE_URL.
import { createRequire } from 'module';

const [pwDir, url, ...rest] = process.argv.slice(2);
const { chromium } = createRequire(pwDir + '/')('playwright-core');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless=new'], // root in a container: no user namespaces for the sandbox
});
const log = [];
try {
  console.log(JSON.stringify(rest[0] === '--scripted' ? await scripted(rest[1]) : await chat(...rest)));
} finally {
  await browser.close();
}

async function newPage() {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  return page;
}

async function chat(prompt, maxTokens, screenshot, second, stopped) {
  const page = await newPage();
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.qwen35 && (window.qwen35.ready || window.qwen35.error), null,
                             { timeout: 120000 });
  const loadMs = Date.now() - t0; // page, wasm, tokenizer, weights, the session
  const isolated = await page.evaluate(() => self.crossOriginIsolated);
  await page.click('#settings > summary'); // settings start folded
  await page.fill('#max-tokens', String(maxTokens));
  const turn = async (text, n, stop) => {
    await page.waitForFunction(() => !document.getElementById('send').disabled, null, { timeout: 60000 });
    await page.fill('#prompt', text);
    await page.press('#prompt', 'Enter');
    if (stop) await page.click('#stop');
    await page.waitForFunction((n) => window.qwen35.results.length >= n || window.qwen35.error, n,
                               { timeout: 300000 });
  };
  await turn(prompt, 1);
  const shown = await page.textContent('.msg.assistant');
  if (second) await turn(second, 2);
  let promptBox = null;
  if (stopped) {
    await turn(stopped, 3, true);
    promptBox = await page.inputValue('#prompt'); // a turn that gave no reply puts its message back
  }
  const state = await page.evaluate(() => window.qwen35);
  await page.screenshot({ path: screenshot, fullPage: true });
  const r = state.results[0] || {};
  const [r2, r3] = state.results.slice(1);
  return { error: state.error, backend: state.backend, crossOriginIsolated: isolated, loadMs,
           ids: r.ids, text: r.text, prompt: r.prompt, shown, finish: r.finish, promptTokens: r.promptTokens,
           prefillTokS: r.prefillTokS, decodeTokS: r.decodeTokS, log: log.slice(-20),
           second: r2 && { ids: r2.ids, text: r2.text, prompt: r2.prompt, finish: r2.finish,
                           promptTokens: r2.promptTokens, reusedTokens: r2.reusedTokens },
           stopped: r3 && { ids: r3.ids, finish: r3.finish, promptTokens: r3.promptTokens,
                            reusedTokens: r3.reusedTokens, promptBox } };
}

async function scripted(fileUrl) {
  const out = {};
  const page = await newPage();
  await page.addInitScript(() => {
    // what app.js sends goes to window.sent; window.answer(...messages) plays the worker's side
    window.sent = [];
    window.Worker = class {
      constructor() { window.worker = this; }
      postMessage(m) { window.sent.push(m); }
    };
    window.answer = (...messages) => { for (const data of messages) window.worker.onmessage({ data }); };
  });
  await page.goto(url);
  const done = (text, n) => ({ type: 'done', ids: Array.from({ length: n }, (_, i) => i), text, finish: 'stop',
                               promptTokens: 20, reusedTokens: 0, prompt: '', prefillTokS: 1, decodeTokS: 1 });
  await page.evaluate(() => window.answer({ type: 'ready', backend: 'wasm', threads: 1, quant: 'fp32',
                                          weightsMiB: 1 }));
  const send = async (text) => {
    await page.fill('#prompt', text);
    await page.press('#prompt', 'Enter');
    return page.evaluate(() => window.sent[window.sent.length - 1]);
  };
  const shown = () => page.evaluate(() => {
    const all = document.querySelectorAll('.msg.assistant');
    const el = all[all.length - 1];
    return { thinkingHidden: el.querySelector('details.thinking').hidden,
             thinking: el.querySelector('details.thinking div').textContent,
             answer: el.querySelector(':scope > div').textContent, failed: el.classList.contains('failed') };
  });
  await page.click('#settings > summary');
  // 1. thinking on: the prompt ends by opening <think>, so the reply is "reasoning</think>\n\nanswer"
  await page.check('#thinking');
  await page.fill('#max-tokens', '0'); // at least one token, not the default's 256
  const first = await send('What is 2+2?');
  const raw = 'The user asks 2+2. That is 4.\n</think>\n\nThe answer is 4.';
  await page.evaluate((raw) => window.answer({ type: 'start', opened: true, promptTokens: 20 },
                                             { type: 'delta', text: raw.slice(0, 12) }), raw);
  out.streaming = await shown(); // still inside the reasoning: nothing shown as the answer yet
  await page.evaluate((d) => window.answer({ type: 'delta', text: d.raw.slice(12) }, d.done),
                      { raw, done: done(raw, 9) });
  out.first = { sent: first, shown: await shown() };
  await page.fill('#max-tokens', '');
  // 2. a turn that fails: its message leaves the history (and comes back to the box), the next turn goes on
  const failed = await send('And 3+3?');
  await page.evaluate(() => window.answer({ type: 'start', opened: true, promptTokens: 40 },
                                          { type: 'error', text: 'OrtRun failed' }));
  out.failed = { sent: failed, shown: await shown(), status: await page.textContent('#status'),
                 error: await page.evaluate(() => window.qwen35.error),
                 promptBox: await page.inputValue('#prompt'),
                 sendDisabled: await page.isDisabled('#send') };
  // 3. stopped before the first token (while the prompt was read): left out of the history as well
  const stopped = await send('And 4+4?');
  await page.evaluate((d) => window.answer({ type: 'start', opened: true, promptTokens: 40 },
                                           { ...d, finish: 'cancelled' }), done('', 0));
  out.stopped = { sent: stopped, shown: await shown() };
  const next = await send('And 5+5?');
  out.next = { sent: next };
  // 4. the real Worker, whose worker.js is missing: the page says so instead of "loading…" forever
  const broken = await newPage();
  await broken.goto(url);
  await broken.waitForFunction(() => window.qwen35 && window.qwen35.error, null, { timeout: 30000 })
    .catch(() => null);
  out.noWorker = { status: await broken.textContent('#status'),
                   error: await broken.evaluate(() => window.qwen35.error),
                   sendDisabled: await broken.isDisabled('#send') };
  // 5. the page opened as a file
  const file = await newPage();
  await file.goto(fileUrl);
  await file.waitForTimeout(500);
  out.file = { status: await file.textContent('#status') };
  out.log = log.slice(-20);
  return out;
}
