// Drives the `qwen35 web` page in headless Chromium (tests/test_web.py): types a prompt, waits for the reply,
// saves a screenshot and prints one JSON line: {ids, text, prefillTokS, decodeTokS, backend, ...}; with a second
// prompt it then sends that one too (a second turn) and adds its reply as `second`.
// usage: node browser_chat.mjs PLAYWRIGHT_CORE_DIR URL PROMPT MAX_TOKENS SCREENSHOT [SECOND_PROMPT]
import { createRequire } from 'module';

const [pwDir, url, prompt, maxTokens, screenshot, second] = process.argv.slice(2);
const { chromium } = createRequire(pwDir + '/')('playwright-core');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless=new'], // root in a container: no user namespaces for the sandbox
});
const log = [];
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.qwen35 && (window.qwen35.ready || window.qwen35.error), null,
                             { timeout: 120000 });
  const loadMs = Date.now() - t0; // page, wasm, tokenizer, weights, the session
  const isolated = await page.evaluate(() => self.crossOriginIsolated);
  await page.click('#settings > summary'); // settings start folded
  await page.fill('#max-tokens', String(maxTokens));
  await page.fill('#prompt', prompt);
  await page.press('#prompt', 'Enter');
  await page.waitForFunction(() => window.qwen35.results.length > 0 || window.qwen35.error, null,
                             { timeout: 300000 });
  const shown = await page.textContent('.msg.assistant');
  if (second) {
    await page.waitForFunction(() => !document.getElementById('send').disabled, null, { timeout: 60000 });
    await page.fill('#prompt', second);
    await page.press('#prompt', 'Enter');
    await page.waitForFunction(() => window.qwen35.results.length > 1 || window.qwen35.error, null,
                               { timeout: 300000 });
  }
  const state = await page.evaluate(() => window.qwen35);
  await page.screenshot({ path: screenshot, fullPage: true });
  const r = state.results[0] || {};
  const r2 = state.results[1];
  console.log(JSON.stringify({ error: state.error, backend: state.backend, crossOriginIsolated: isolated, loadMs,
                               ids: r.ids, text: r.text, prompt: r.prompt, shown, finish: r.finish, promptTokens: r.promptTokens,
                               prefillTokS: r.prefillTokS, decodeTokS: r.decodeTokS, log: log.slice(-20),
                               second: r2 && { ids: r2.ids, text: r2.text, prompt: r2.prompt, finish: r2.finish,
                                               promptTokens: r2.promptTokens, reusedTokens: r2.reusedTokens } }));
} finally {
  await browser.close();
}
