"""The training loop: AdamW with warmup + cosine, clipping, accumulation, bf16 autocast, checkpoints in the
official layout, and an exact resume.

Data order is a pure function of (seed, step) and the trainer state (optimizer, scheduler, step, losses) is
saved with fp32 weights, so stopping and resuming gives the same losses as an uninterrupted run. Checkpoints
are `qwen3_5_text` configs with `model.*` safetensors (tied head omitted), which both `qwen35.load_model` and
transformers' AutoModelForCausalLM load.

Saving (all or nothing) and the resume checks live in run_state.py.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import ModelConfig
from ..model.qwen35 import Qwen35ForCausalLM
from .data import IGNORE, PackedRow
from .run_state import (
    METRICS_FILE,
    STATE_FILE,
    TrainError,
    check_processes,
    check_same_lora,
    check_same_run,
    check_steps,
    cut_metrics,
    gather_state,
    load_sharded_optimizer,
    load_state,
    lora_info,
    save,
)
from .vocab_loss import banded_cross_entropy


@dataclass
class TrainConfig:
    steps: int = 100
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    bf16: bool = False
    grad_checkpoint: bool = False
    fsdp: bool = False  # shard parameters and optimizer state across processes (FSDP2) instead of DDP
    mtp_weight: float = 0.3  # weight of the MTP loss (token after next) when the model has an MTP head
    data: list | None = None  # data_fingerprint of the training files, so a resume can refuse other data


def init_model(config: ModelConfig, seed: int = 0, std: float = 0.02) -> Qwen35ForCausalLM:
    """A freshly initialised model (the reference's scheme: normal(std) matrices, zero-centred norms at 0,
    gated norm at 1, A = exp(A_log) uniform in [1, 16], dt_bias 1)."""
    torch.manual_seed(seed)
    model = Qwen35ForCausalLM(config, mtp_layers=config.mtp_num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.weight"):
                p.zero_()
            elif p.dim() >= 2 and "conv1d" not in name:
                p.normal_(0, std)
    return model


def _check_finite(step: int, loss: float, norm: torch.Tensor) -> None:
    """A non-finite loss or gradient would make every weight NaN from this step on: stop before applying it."""
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainError(f"step {step}: the loss is {loss} and the gradient norm {norm}: training diverged "
                         "(try a lower --lr); this step was not applied or saved")


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(1, cfg.warmup)
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def batch_rows(rows: list[PackedRow], step: int, micro: int, cfg: TrainConfig):
    """The rows of one micro-batch: a pure function of (step, micro)."""
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    picked = [rows[(start + i) % len(rows)] for i in range(cfg.batch_size)]
    return (torch.stack([r.ids for r in picked]), torch.stack([r.labels for r in picked]),
            torch.stack([r.segments for r in picked]))


LOSS_CHUNK_BYTES = 128 * 2**20  # fp32 logits computed at once by the chunked loss


def _chunk_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")


def summed_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of the logits of hidden [B, T, H] against labels [B, T].
    A frozen head (LoRA, QLoRA) goes through vocab_loss.banded_cross_entropy (no [rows, vocab] tensor at
    all). A trainable one: with gradient checkpointing, in chunks of rows whose logits are recomputed in backward: the [B*T, vocab]
    fp32 logits, their softmax and gradient (3 GB at 1024 tokens of the 248K vocabulary) never exist at once."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    w = model.head_weight
    if not (isinstance(w, torch.Tensor) and w.requires_grad):  # a frozen head (LoRA, QLoRA): vocabulary bands
        return banded_cross_entropy(h, w, y)
    rows = max(1, LOSS_CHUNK_BYTES // (4 * model.config.vocab_size))
    if not (model.gradient_checkpointing and torch.is_grad_enabled()) or h.shape[0] <= rows:
        return _chunk_loss(model, h, y)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], rows):
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, model, h[s : s + rows], y[s : s + rows],
                                                          use_reentrant=False)
    return total


class Objective(torch.nn.Module):
    """Summed cross-entropy of a packed batch: next token, and (with an MTP head) the token after next
    through the MTP path. One module, so DistributedDataParallel sees every parameter it uses."""

    def __init__(self, model: Qwen35ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, segments, mtp: bool = True):
        m = self.model
        hidden = m.hidden_states(ids, segments=segments)
        main = summed_cross_entropy(m, hidden, labels)
        if m.mtp is None or not mtp or ids.shape[1] < 3:
            return main, int((labels != IGNORE).sum()), main.new_zeros(()), 0
        # row t sees token t+1 and hidden t, predicts token t+2 (= the main label of t+1) in t's document
        seg = segments[:, :-1]
        mtp_labels = torch.where(segments[:, 1:] == seg, labels[:, 1:], IGNORE)
        if m.gradient_checkpointing and torch.is_grad_enabled():  # the MTP layer recomputes like the others
            mtp_hidden = torch.utils.checkpoint.checkpoint(m.mtp_hidden, hidden[:, :-1], ids[:, 1:], None, None, 0,
                                                           seg, use_reentrant=False)
        else:
            mtp_hidden = m.mtp_hidden(hidden[:, :-1], ids[:, 1:], segments=seg)
        extra = summed_cross_entropy(m, mtp_hidden, mtp_labels)
        return main, int((labels != IGNORE).sum()), extra, int((mtp_labels != IGNORE).sum())


def loss_on(model, ids, labels, segments, bf16: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the targets, and their count."""
    obj = model if isinstance(model, (Objective, torch.nn.parallel.DistributedDataParallel)) else Objective(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        main, n, _, _ = obj(ids, labels, segments, mtp=False)
    return main, n


def evaluate(model, rows: list[PackedRow], batch_size: int = 4) -> float:
    """Mean next-token loss over `rows`, `batch_size` rows a forward. Under torchrun every process evaluates
    its share of each batch (rows rank, rank + world, ...) and the sums are added across processes: a sharded
    (FSDP) model's forward is a collective, so a process whose share of the last batch is empty runs one on
    a row it does not count."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    total = torch.zeros(2, dtype=torch.float64)  # summed loss, target count
    with torch.no_grad():
        for i in range(0, len(rows), batch_size * world):
            chunk = rows[i : i + batch_size * world][rank::world]
            loss, n = loss_on(model, *(torch.stack([getattr(r, k) for r in chunk or rows[:1]])
                                       for k in ("ids", "labels", "segments")))
            if chunk:
                total += torch.tensor([float(loss), n], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0]) / max(1.0, float(total[1]))


def train(model: Qwen35ForCausalLM, rows: list[PackedRow], cfg: TrainConfig, out: str | Path,
          tokenizer_dir: str | Path | None = None, resume: bool | dict = False, eval_rows: list[PackedRow] | None = None,
          log=print, until: int | None = None) -> list[float]:
    """Train for cfg.steps steps (from the saved step when resume). Returns the loss of every step.
    until: stop (and save) after this step, as an interrupted run would; the schedule still spans cfg.steps."""
    out = Path(out)
    if not rows:
        raise TrainError("no rows to train on")
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    check_processes(cfg.batch_size, world)
    from .qlora import check_trainable

    check_trainable(model, getattr(model, "lora_active", False), distributed and cfg.fsdp)
    log = log if rank == 0 else (lambda s: None)
    model.train()
    if not getattr(model, "lora_active", False):
        model.requires_grad_(True)  # (with LoRA only the adapters train; apply_lora set that)
    # the MTP loss needs a token after next in the row; without it (or with its weight 0) the head gets no
    # gradient, so it is frozen: DDP would wait at the next step for gradients that never come, and the saved
    # head stays as it was
    mtp = model.mtp is not None and cfg.mtp_weight > 0 and rows[0].ids.shape[-1] >= 3
    if model.mtp is not None and not mtp:
        model.mtp.requires_grad_(False)
        if cfg.mtp_weight > 0:
            log(f"--seq-len {rows[0].ids.shape[-1]} leaves no token after next: the MTP head is not trained")
    model.gradient_checkpointing = cfg.grad_checkpoint
    # data-parallel: every process holds the model, takes its share of each global batch, and DDP averages
    # the gradients (no communication code of ours)
    objective = Objective(model)
    runner = objective
    sharded = distributed and cfg.fsdp
    if sharded:
        from torch.distributed.fsdp import fully_shard

        from ..ops.fast import bind_kernels

        # sharding gives every parameter new storage: fused matrices (a loaded model's) and bound kernels would
        # go on reading the loaded weights in no-grad forwards (the eval), so each projection reads its own
        if model.kernels:
            bind_kernels(model, False)
        model.unfuse_projections()
        for layer in model.model.layers:
            fully_shard(layer)
        runner = fully_shard(objective)
    elif distributed:
        runner = torch.nn.parallel.DistributedDataParallel(objective)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "conv1d" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "conv1d" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, losses = 0, []
    adapters = lora_info(model)
    if resume:  # a state read already (the command checks it before loading the model), or True: read it
        state = resume if isinstance(resume, dict) else load_state(out)
        check_same_run(state, asdict(cfg), out)
        check_steps(state, cfg.steps, out)
        check_same_lora(state.get("lora"), adapters, out)
        try:
            if sharded:  # (the saved state is whole: each process loads its shards of it)
                load_sharded_optimizer(model, opt, state["optimizer"])
            else:
                opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # other trainable parameters: full vs LoRA, other --lora-targets, MTP on/off
            raise TrainError(f"{out / STATE_FILE}: its optimizer state does not fit the parameters trained now "
                             f"({e}): resume with the run's own --lora-rank / --lora-targets / --mtp-weight") from None
        sched.load_state_dict(state["scheduler"])
        start, losses = state["step"], list(state["losses"])
        log(f"resumed at step {start}")
        if rank == 0:
            cut_metrics(out / METRICS_FILE, start)
    out.mkdir(parents=True, exist_ok=True)
    # a new run starts its own metrics (the command refuses a folder holding a run that saved, so what is
    # there is what a run killed before its first save left)
    metrics = open(out / METRICS_FILE, "a" if resume else "w") if rank == 0 else None
    t0 = time.perf_counter()
    tokens_seen = 0
    last = min(cfg.steps, until or cfg.steps)
    bar, saved = None, False
    if rank == 0 and sys.stderr.isatty():  # an interactive bar; logs and pipes get the loss= lines only
        from tqdm import tqdm

        bar = tqdm(total=last - start, desc="training", unit="step", leave=False)
    for step in range(start, last):
        opt.zero_grad(set_to_none=True)
        parts = [batch_rows(rows, step, m, cfg) for m in range(cfg.grad_accum)]
        parts = [(ids[rank::world], lab[rank::world], seg[rank::world]) for ids, lab, seg in parts]
        count = torch.tensor(float(sum(int((lab != IGNORE).sum()) for _, lab, _ in parts)))
        if distributed:
            dist.all_reduce(count)
        count = max(1.0, float(count))
        total = torch.zeros(2)
        for ids, labels, segments in parts:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                main, _, extra, _ = runner(ids, labels, segments, mtp=mtp)
            # DDP averages over processes; the target is the sum over the global batch / its target count
            ((main + cfg.mtp_weight * extra) * world / count).backward()
            total += torch.stack([main.detach(), extra.detach()])
            tokens_seen += ids.numel() * world
        if distributed:
            dist.all_reduce(total)
        total, mtp_total = float(total[0]), float(total[1])
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.clip)
        try:
            _check_finite(step + 1, total / count, norm)
        except TrainError:
            if metrics is not None:
                metrics.close()
                if not resume and not saved:  # (a failed new run takes back what it wrote)  # nothing of this run is kept: no metrics of a run that left no weights
                    (out / METRICS_FILE).unlink(missing_ok=True)
            if bar is not None:
                bar.close()
            raise
        opt.step()
        sched.step()
        losses.append(total / count)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == last:
            elapsed = time.perf_counter() - t0
            rate = tokens_seen / elapsed
            eta = elapsed / (step + 1 - start) * (last - step - 1)
            mtp_note = f" mtp_loss={mtp_total / count:.4f}" if mtp else ""
            log(f"step {step + 1}/{cfg.steps} loss={losses[-1]:.4f}{mtp_note} lr={sched.get_last_lr()[0]:.2e} "
                f"tok/s={rate:.0f} eta={eta:.0f}s")
            if metrics is not None:
                metrics.write(json.dumps({"step": step + 1, "loss": losses[-1], "lr": sched.get_last_lr()[0],
                                          "tok_s": rate}) + "\n")
                metrics.flush()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == last:
            full, optimizer = gather_state(model, opt) if sharded else (None, None)  # a collective: rank 0 writes
            if rank != 0:
                continue
            state = {"step": step + 1, "losses": losses, "config": asdict(cfg), "lora": adapters,
                     "optimizer": optimizer if sharded else opt.state_dict(), "scheduler": sched.state_dict()}
            save(model, out, Path(tokenizer_dir) if tokenizer_dir else None, full, state)
            saved = True
    if bar is not None:
        bar.close()
    if distributed:
        dist.barrier()
    if eval_rows:  # every process evaluates its share (through the sharded model under FSDP); rank 0 writes
        eval_loss = evaluate(runner if sharded else objective, eval_rows)
        log(f"eval loss={eval_loss:.4f}")
        if metrics is not None:
            # JSON has no NaN or Infinity (finite weights can still overflow on other data): null stands for them
            metrics.write(json.dumps({"step": cfg.steps,
                                      "eval_loss": eval_loss if math.isfinite(eval_loss) else None}) + "\n")
    if metrics is not None:
        metrics.close()
    model.gradient_checkpointing = False
    model.eval()
    model.requires_grad_(False)
    return losses
