"""Our q4_k / q6_k quantizers (the torch reference and the C++ one) against libggml's own: the bytes that
`ggml_quantize_chunk` writes without an importance matrix (llama.cpp's `quantize` path for Q4_K / Q6_K), from
the llama-cpp-python build that benchmarks/llamacpp.py keeps in .cache/llamacpp-venv; and, where bench_quant.py
--llama-cpp left it, llama.cpp's Q4_K_M file of the bundled model against our quantization of the same
checkpoint tensors. Prints the differing super-blocks, then one JSON line.

    python benchmarks/check_kquant_vs_ggml.py [--seeds 3] [--rows 256] [--cols 1024]
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TYPES = {"q4_k": (12, 144), "q6_k": (14, 210)}  # ggml_type, bytes per super-block


def libggml():
    import llamacpp  # (benchmarks/llamacpp.py: the machine-wide llama-cpp-python build)

    found = sorted(llamacpp.VENV.rglob("libggml-base.so"))
    if not found:
        raise SystemExit(f"no libggml-base.so under {llamacpp.VENV}: run `python benchmarks/llamacpp.py install` once")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_bytes(lib, w: torch.Tensor, scheme: str) -> torch.Tensor:
    kind, nb = TYPES[scheme]
    x = np.ascontiguousarray(w.float().numpy())
    N, K = x.shape
    out = np.zeros((N, K // 256 * nb), np.uint8)
    lib.ggml_quantize_chunk(kind, x.ctypes.data, out.ctypes.data, 0, N, K, None)
    return torch.from_numpy(out)


def main() -> None:
    from qwen35.ops import kernels
    from qwen35.quant import formats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args()
    lib = libggml()
    out = {"bench": "kquant_vs_ggml", "runs": []}
    print(f"{'scheme':<8}{'seed':>5}{'super-blocks':>14}{'torch != ggml':>15}{'c++ != ggml':>13}")
    for scheme, (_, nb) in TYPES.items():
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(args.rows, args.cols, generator=g) * torch.rand(args.rows, 1, generator=g) * 3
            w[0, :256] = 0
            w[1, :32] = -0.5
            w = w.bfloat16().float()  # what checkpoints hold
            ref = ggml_bytes(lib, w, scheme).reshape(-1, nb)
            ours = formats.quantize(scheme, w)[0].reshape(-1, nb)
            fast = formats.quantize_fast(scheme, w)[0].reshape(-1, nb) if kernels.available() else None
            row = {"scheme": scheme, "seed": seed, "superblocks": ref.shape[0],
                   "torch_diff": int((ours != ref).any(-1).sum()),
                   "cpp_diff": None if fast is None else int((fast != ref).any(-1).sum())}
            out["runs"].append(row)
            print(f"{scheme:<8}{seed:>5}{row['superblocks']:>14}{row['torch_diff']:>15}{row['cpp_diff']!s:>13}")
    gguf_file = HERE / ".cache" / "gguf" / "bundled" / "model-q4_k_m.gguf"
    if gguf_file.is_file():
        out["gguf_file"] = gguf_tensors(gguf_file)
    print(json.dumps(out))


GGUF_NAMES = {"token_embd.weight": "embed_tokens.weight", "blk.0.ffn_down.weight": "layers.0.mlp.down_proj.weight",
              "blk.1.ffn_up.weight": "layers.1.mlp.up_proj.weight", "blk.2.ssm_out.weight": "layers.2.linear_attn.out_proj.weight",
              "blk.3.ffn_gate.weight": "layers.3.mlp.gate_proj.weight"}  # tensors llama.cpp's converter does not permute


def gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from qwen35.commands.common import default_model
    from qwen35.quant import formats

    state = {}
    for f in Path(default_model()).glob("*.safetensors"):
        state.update(load_file(str(f)))
    rows = {}
    print("\nllama.cpp's Q4_K_M file of the bundled model vs our quantization of the checkpoint")
    for t in GGUFReader(str(path)).tensors:
        if t.name not in GGUF_NAMES:
            continue
        w = next(v for k, v in state.items() if k.endswith(GGUF_NAMES[t.name])).float()
        scheme = t.tensor_type.name.lower()
        ours = formats.quantize_fast(scheme, w)[0].numpy()
        nb = TYPES[scheme][1]
        diff = int((ours.reshape(-1, nb) != np.asarray(t.data).reshape(-1, nb)).any(-1).sum())
        rows[t.name] = {"scheme": scheme, "superblocks": ours.size // nb, "differing": diff}
        print(f"{t.name:<24}{scheme:<6}{ours.size // nb:>8} super-blocks, {diff} differ")
    return rows


if __name__ == "__main__":
    main()
