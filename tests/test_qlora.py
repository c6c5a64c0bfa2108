"""Fine-tuning on a quantized base (train/qlora.py, quant/weight.py QuantizedMatmul): the input gradient through
a packed matrix equals the one through its dequantized reference, no full-precision copy enters the graph,
every adapter learns while the packed bytes stay as they were, the merged checkpoints give the logits of
base + adapters, resume is exact, and the combinations that cannot work are one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen35
from qwen35.ops import kernels
from qwen35.quant import formats
from qwen35.quant import weight as qweight
from qwen35.quant.weight import QuantizedWeight
from qwen35.train.data import Document, pack
from qwen35.train.loop import Objective, TrainConfig, train
from qwen35.train.lora import LoRALinear, apply_lora

BUNDLED = Path(qwen35.__file__).parent / "assets" / "model"
SCHEMES = ("q8_0", "q4_0", "q4_k", "q6_k")


@pytest.fixture(autouse=True)
def one_thread():
    # on a shared machine two OpenMP threads spin-waiting on each other made these steps 30x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quantized_base(dtype=torch.bfloat16):
    # as `qwen35 train --quant int4 [--bf16]` loads it: the bundled model's bf16 weights quantized at load
    return qwen35.load_model(BUNDLED, dtype=dtype, quant="int4", kernels=dtype == torch.bfloat16)


def packed(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (w.qs.clone(), w.d.clone()) for n, w in model.named_weights() if isinstance(w, QuantizedWeight)}


def rows(seq_len=32, n=8):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 400, (n * seq_len,), generator=gen).tolist()
    docs = [Document(ids[i : i + 48], [True] * len(ids[i : i + 48])) for i in range(0, len(ids), 48)]
    return pack(docs, seq_len)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bands", [1, 3])
def test_input_gradient_equals_the_dequantized_reference(scheme, bands, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    N, K = 96, 512
    w = QuantizedWeight(scheme, *formats.quantize_fast(scheme, torch.randn(N, K, generator=gen) * 0.05), K)
    monkeypatch.setattr(qweight, "BAND_BYTES", 2 * K * -(-N // bands))  # forward and backward in `bands` bands
    assert len(w._bands()) == bands
    ref_w = formats.dequantize(scheme, w.qs, w.d, torch.float32)
    x = torch.randn(20, K, generator=gen, requires_grad=True)
    g = torch.randn(20, N, generator=gen)
    y = w.matmul(x, out_fp32=False)
    y.backward(g)
    torch.testing.assert_close(y, x.detach() @ ref_w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g @ ref_w, rtol=1e-5, atol=1e-5)
    # bf16 through the C++ dequantizer: within twice what rounding the reference itself to bf16 costs
    if not kernels.available():
        pytest.skip(f"C++ kernels unavailable: {kernels.unavailable_reason()}")
    w.dtype, w.kernels = torch.bfloat16, True
    xb = x.detach().bfloat16().requires_grad_(True)
    w.matmul(xb, out_fp32=False).backward(g.bfloat16())
    exact = g @ ref_w
    own_rounding = ((g.bfloat16() @ ref_w.bfloat16()).float() - exact).abs().max()
    assert (xb.grad.float() - exact).abs().max() <= 2 * own_rounding + 1e-6


def test_no_full_precision_copy_of_a_quantized_matrix_is_saved_for_backward():
    model = quantized_base()
    apply_lora(model, rank=3)  # (rank 4 would make lora_A [4, 256], the shape of in_proj_a)
    shapes = {tuple(w.shape) for _, w in model.named_weights() if isinstance(w, QuantizedWeight)}
    saved = []

    def pack_hook(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss, _, extra, _ = Objective(model)(x, x, torch.zeros_like(x))
    assert saved and not shapes & set(saved), shapes & set(saved)
    (loss + extra).backward()


def test_every_adapter_learns_and_the_packed_bytes_stay(tmp_path):
    model = quantized_base()
    before = packed(model)
    names = apply_lora(model, rank=4)
    assert len(names) == 6 * 6 + 2 * 7 + 7  # decoder (DeltaNet x6, attention x2) and the MTP layer
    # the fused groups run per projection on row slices of their packed matrices: views, nothing copied
    for owner, attr, linears in model.fusion_groups():
        assert getattr(owner, attr) is None
        assert all(isinstance(lin.weight, QuantizedWeight) for lin in linears)
    ids = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    model.train()
    loss, _, extra, _ = Objective(model)(ids, ids, torch.zeros_like(ids))
    (loss + extra).backward()
    modules = dict(model.named_modules())
    no_grad = [n for n in names if modules[n].lora_B.grad is None or not modules[n].lora_B.grad.any()]
    assert not no_grad, no_grad
    model.zero_grad()
    cfg = TrainConfig(steps=3, seq_len=32, batch_size=2, lr=1e-2, warmup=1, bf16=True, grad_checkpoint=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train(model, rows(), cfg, tmp_path / "run", log=lambda s: None)
    after = packed(model)
    assert before.keys() == after.keys() and len(after) > 50
    assert all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if n.endswith("lora_A"))
    # only the adapters are written (the base is the base's), with what resume needs to check it
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "adapter_config.json", "lora.safetensors", "metrics.jsonl", "trainer_state.pt"]
    meta = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert meta["quant"] == "int4" and meta["rank"] == 4 and len(meta["modules"]) == len(names)


def test_resume_continues_exactly(tmp_path):
    from qwen35.train.qlora import load_adapters

    cfg = TrainConfig(steps=4, seq_len=32, batch_size=2, lr=1e-2, warmup=1, bf16=True, grad_checkpoint=True)
    data = rows()
    model = quantized_base()
    apply_lora(model, rank=2)
    straight = train(model, data, cfg, tmp_path / "a", log=lambda s: None)
    model = quantized_base()
    apply_lora(model, rank=2)
    train(model, data, cfg, tmp_path / "b", log=lambda s: None, until=2)
    model = quantized_base()
    apply_lora(model, rank=2)
    load_adapters(model, tmp_path / "b")
    resumed = train(model, data, cfg, tmp_path / "b", resume=True, log=lambda s: None)
    assert resumed == straight


def test_merged_checkpoints_give_the_logits_of_base_plus_adapters(tmp_path):
    from safetensors.torch import load_file

    from qwen35.train.qlora import write_merged

    x = torch.randint(0, 8192, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        original = qwen35.load_model(BUNDLED)(x)  # fp32 compute on the bundled bf16 weights
    models = {}
    for merge in ("bf16", "int4"):
        model = quantized_base(torch.float32)
        base = packed(model)
        apply_lora(model, rank=4, targets=("q_proj", "in_proj_qkv", "out_proj", "gate_proj", "down_proj"))
        gen = torch.Generator().manual_seed(9)
        with torch.no_grad():
            plain = model(x)
            for m in model.modules():  # adapters as training leaves them: B no longer zero
                if isinstance(m, LoRALinear):
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.02)
            adapted = model(x)
        expected = {n: (m.weight.dequantize(torch.float32) + m.lora_scale * m.lora_B @ m.lora_A)
                    for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        write_merged(model, tmp_path / merge, merge, tokenizer_dir=BUNDLED)
        models[merge] = (plain, adapted, expected, base, qwen35.load_model(tmp_path / merge))
    plain, adapted, expected, base, merged = models["bf16"]
    stored = {k: v for f in (tmp_path / "bf16").glob("*.safetensors") for k, v in load_file(f).items()}
    for n, w in expected.items():  # the file holds dequantize + scale * B A, rounded once to bf16
        assert torch.equal(stored[n + ".weight"], w.bfloat16()), n
    assert (adapted - plain).abs().max() > 0.05  # the adapters change the logits
    with torch.no_grad():
        got = merged(x)
    # bf16 storage of the merged matrices: tolerance from what rounding the unmerged base's matrices to bf16
    # does to the logits (the bundled checkpoint's own bf16 vs its dequantized int4)
    own = (original - plain).abs().max()
    assert (got - adapted).abs().max() <= own, ((got - adapted).abs().max(), own)
    plain, adapted, expected, base, merged = models["int4"]
    assert merged.quant == "int4"
    with torch.no_grad():
        got = merged(x)
    # re-quantizing the merged matrices: no worse than quantizing the base was in the first place
    assert (got - adapted).abs().max() <= (original - plain).abs().max()
    requant = packed(merged)
    untouched = [n for n in base if n.rsplit(".", 2)[-2] in ("in_proj_z", "up_proj", "v_proj")]
    assert untouched and all(torch.equal(requant[n][0], base[n][0]) for n in untouched)  # not rounded twice


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "qwen35", "train", "--threads", "1", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bad_combinations_are_one_line_errors(tmp_path):
    (tmp_path / "d.txt").write_text("hello world. " * 50)
    common = ["--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "o")]
    cases = [
        (["--init-from", str(BUNDLED), "--quant", "int4"], "only adapters can train: add --lora-rank R"),
        (["--init-from", str(BUNDLED), "--quant", "int4", "--lora-rank", "2", "--fsdp"],
         "omit --fsdp with --quant"),
        (["--config", str(BUNDLED / "config.json"), "--quant", "int4", "--lora-rank", "2"],
         "give --init-from"),
        (["--init-from", str(BUNDLED), "--quant", "int3", "--lora-rank", "2"], "--quant int3: use one of"),
        (["--init-from", str(BUNDLED), "--quant", "int4", "--lora-rank", "2", "--merge", "fp8"],
         "--merge fp8: use bf16 or one of"),
    ]
    for args, message in cases:
        r = cli(*args, *common)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    r = cli("--init-from", str(BUNDLED), "--merge", "bf16", "--lora-rank", "2", *common)
    assert r.returncode == 1 and "--merge and --export-gguf are for a quantized base" in r.stderr


def test_train_cli_on_a_quantized_base_resumes_merges_and_exports(tmp_path):
    from qwen35.gguf import open_gguf

    (tmp_path / "d.txt").write_text(" ".join(f"word{i % 37} and more {i % 11}." for i in range(400)))
    args = ["--init-from", str(BUNDLED), "--quant", "int4", "--lora-rank", "2", "--bf16", "--data",
            str(tmp_path / "d.txt"), "--out", str(tmp_path / "o"), "--seq-len", "32", "--batch-size", "1",
            "--mtp-weight", "0"]
    first = cli(*args, "--steps", "2", "--save-every", "1")
    assert first.returncode == 0, first.stderr
    assert "step 2/2 loss=" in first.stdout
    again = cli(*args, "--steps", "3", "--resume", "--merge", "int4", "--export-gguf", str(tmp_path / "m.gguf"),
                "--gguf-type", "q8_0")
    assert again.returncode == 0, again.stderr
    assert "resumed at step 2" in again.stdout and "step 3/3 loss=" in again.stdout
    merged = qwen35.load_model(tmp_path / "o" / "merged")
    assert merged.quant == "int4" and (tmp_path / "o" / "merged" / "tokenizer.json").is_file()
    assert open_gguf(tmp_path / "m.gguf") is not None


@pytest.mark.parametrize("merge", ["bf16", "int8"])
def test_merged_vision_checkpoint_keeps_its_tower(vision_replica, tmp_path, merge):
    """QLoRA on a composite checkpoint: the merged model is a composite checkpoint whose tower (frozen, and
    stored unquantized in the source's precision, as `qwen35 quantize` keeps it) gives the source's features,
    and whose logits on an image prompt are those of the model merged in place. (It was written text-only,
    and loaded back without a tower.)"""
    from test_train import check_vision_checkpoint, corpus_rows, image_logits, vision_source

    from qwen35.train.qlora import write_merged

    source = vision_source(vision_replica[1], tmp_path)
    model = qwen35.load_model(source, quant="int8")
    tower = {n: p.clone() for n, p in model.visual.named_parameters()}
    apply_lora(model, rank=4)
    cfg = TrainConfig(steps=1, seq_len=64, batch_size=2, lr=1e-2, warmup=1, grad_checkpoint=True)
    train(model, corpus_rows(), cfg, tmp_path / "run", log=lambda s: None)
    assert all(torch.equal(p, tower[n]) for n, p in model.visual.named_parameters())  # frozen
    write_merged(model, tmp_path / "merged", merge)
    merged = check_vision_checkpoint(tmp_path / "merged", source)
    assert merged.quant == (None if merge == "bf16" else "int8")
    got, want = image_logits(merged)[0], image_logits(model)[0]
    if merge == "int8":  # the merged model's own bytes, read back as they are
        assert torch.equal(got, want)
    else:  # every matrix rounded to bf16: no further off than quantizing the base to int8 put it
        own = (image_logits(qwen35.load_model(source))[0]
               - image_logits(qwen35.load_model(source, quant="int8"))[0]).abs().max()
        assert (got - want).abs().max() <= own, ((got - want).abs().max(), own)
