"""cuDNN fused attention vs the XLA path on the GPU: agreement (outputs and gradients, bf16) and kernel times.

    PYTHONPATH=. python benchmarks/attention_check.py --out DIR      # on an NVIDIA GPU; DIR/attention.json
    PYTHONPATH=. .venv/bin/python benchmarks/attention_check.py --tiny --out /tmp/att   # CPU rehearsal

Random bf16 q/k/v (normal, std 1) at LLaVA-1.5-7B's language-model shape (8 × 1024 tokens, 32 heads of 128) and
its CLIP tower's (577 tokens, 16 heads of 64), through `ports.layers.cudnn_attention` and
`ports.layers.dot_product_attention` with the mask the decoder builds (`causal_mask`): causal without padding,
with left padding (rows of 100 %, 70 %, 30 %, 50 %, 90 % and 1 real token), with a sliding window of 256, grouped (8 kv heads),
and without the key mask the decoder always passes (its cost),
and the vision tower's full attention. Errors are over real (non-pad) query rows, relative to the largest |output|
of the XLA path; gradients are those of sum(out · r) for a fixed random r, with respect to q, k and v. Kernel times
are medians of 10 jitted calls after a warm-up.

`--preset` adds the whole LLaVA-1.5-7B preset (random bf16 weights as the GPU benchmarks', 4 rows × 1024 tokens, rows 1 and 3
left-padded by 300 and 100 tokens): logits of the bf16 model with the cuDNN kernel and with the XLA path, each
against the same weights in float32 (XLA path, matrix products at highest precision), over real positions. On a machine without cuDNN the script says so and exits 1;
`--tiny` rehearses it anywhere with small shapes and jax's XLA reference in place of the cuDNN kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import logger, utc_now, versions  # noqa: E402

log = logger("attention")


def case_arrays(rng, batch, tokens, heads, kv_heads, head_dim):
    import jax.numpy as jnp

    q = rng.standard_normal((batch, tokens, heads, head_dim), np.float32)
    k, v = (rng.standard_normal((batch, tokens, kv_heads, head_dim), np.float32) for _ in range(2))
    r = rng.standard_normal((batch, tokens, heads, head_dim), np.float32)
    return tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, r))


def median_ms(fn, *args, repeats: int = 10) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def compare_kernels(name, q, k, v, r, causal, valid, window, key_mask=True, implementation="cudnn") -> dict:
    import jax
    import jax.numpy as jnp

    from ports.layers import causal_mask, cudnn_attention, dot_product_attention

    b, t, _, e = q.shape
    scale = e**-0.5
    valid = jnp.asarray(valid)
    # The mask and the cotangent are arguments (as constants XLA spent seconds folding them). The cotangent is zero
    # on padded query rows, as in training: their outputs differ between the kernels and nothing reads them.
    r = r * valid[:, :, None, None].astype(r.dtype)

    def xla(q, k, v, valid):
        allowed = causal_mask(valid, 0, t, window).allowed if causal else jnp.ones((1, 1, 1, 1), bool)
        return dot_product_attention(q, k, v, allowed, scale)

    def fused(q, k, v, valid):
        return cudnn_attention(q, k, v, scale, causal=causal, valid_keys=valid if key_mask else None,
                               window=window, implementation=implementation)

    def grads(attention):
        return jax.jit(jax.grad(lambda q, k, v, valid, r: jnp.sum(attention(q, k, v, valid).astype(jnp.float32)
                                                                  * r.astype(jnp.float32)), argnums=(0, 1, 2)))

    xla_jit, fused_jit = jax.jit(xla), jax.jit(fused)
    want = np.asarray(xla_jit(q, k, v, valid), np.float32)
    got = np.asarray(fused_jit(q, k, v, valid), np.float32)
    rows = np.asarray(valid)
    scale_out = float(np.abs(want[rows]).max())
    out = {"case": name, "shape": list(q.shape), "kv_heads": int(k.shape[2]), "causal": causal, "window": window,
           "padded": bool(not valid.all()), "key_mask": key_mask, "max_abs_err_rel": float(np.abs(got - want)[rows].max() / scale_out),
           "mean_abs_err_rel": float(np.abs(got - want)[rows].mean() / scale_out),
           "fused_finite_everywhere": bool(np.isfinite(got).all())}
    g_want = [np.asarray(g, np.float32) for g in grads(xla)(q, k, v, valid, r)]
    g_got = [np.asarray(g, np.float32) for g in grads(fused)(q, k, v, valid, r)]
    out["grad_max_abs_err_rel"] = {n: float(np.abs(a - w).max() / np.abs(w).max())
                                   for n, a, w in zip("qkv", g_got, g_want)}
    out["xla_ms"], out["cudnn_ms"] = median_ms(xla_jit, q, k, v, valid), median_ms(fused_jit, q, k, v, valid)
    log(f"{name}: max err {out['max_abs_err_rel']:.2e} (rel. to max |out|), grads "
        f"{max(out['grad_max_abs_err_rel'].values()):.2e}; xla {out['xla_ms']:.2f} ms, cudnn {out['cudnn_ms']:.2f} ms")
    return out


def preset_logits(tiny: bool, rows: int = 4, tokens: int = 1024) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.common import llava_config, random_lm, vlm_batch
    from ports.layers import set_attention_implementation
    from ports.presets import build_abstract

    config = llava_config(tiny)
    lm = random_lm(config)
    batch = vlm_batch(config, rows, tokens if not tiny else 32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pads = (300, 100) if not tiny else (8, 3)
    for row, pad in zip((1, 3), pads):
        ids[row] = np.concatenate([np.full(pad, config["pad_token_id"], ids.dtype), ids[row, :-pad]])
        mask[row, :pad] = 0
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
              "pixel_values": jnp.asarray(batch["pixel_values"], jnp.bfloat16)}

    def logits(model, params, inputs):
        return np.asarray(jax.jit(lambda p, i: model.apply({"params": p}, **i).logits)(params, inputs))

    fused = logits(lm.model, lm.params, inputs)
    previous = set_attention_implementation("xla")
    try:
        xla = logits(lm.model, lm.params, inputs)
        params32 = jax.tree.map(lambda p: p.astype(jnp.float32), lm.params)
        del lm.params
        with jax.default_matmul_precision("highest"):
            reference = logits(build_abstract(config, jnp.float32).model, params32,
                               dict(inputs, pixel_values=inputs["pixel_values"].astype(jnp.float32)))
    finally:
        set_attention_implementation(previous)
    real = mask.astype(bool)

    def against(x, ref):
        diff = np.abs(x - ref)[real]
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "argmax_agree": float(np.mean(x.argmax(-1)[real] == ref.argmax(-1)[real]))}

    out = {"rows": rows, "tokens": int(ids.shape[1]), "left_padding": list(pads),
           "max_abs_logit_float32": float(np.abs(reference[real]).max()),
           "bf16_cudnn_vs_float32": against(fused, reference), "bf16_xla_vs_float32": against(xla, reference),
           "bf16_cudnn_vs_bf16_xla": against(fused, xla), "cudnn_finite_everywhere": bool(np.isfinite(fused).all())}
    log(f"preset logits: {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="small shapes, jax's XLA reference instead of cuDNN")
    p.add_argument("--preset", action="store_true", help="also compare the LLaVA-1.5-7B preset's logits")
    args = p.parse_args(argv)
    import functools

    import jax

    from ports.layers import _flash_capable_gpu

    if not args.tiny and not _flash_capable_gpu():
        log(f"no NVIDIA GPU with cuDNN flash attention here (backend {jax.default_backend()})")
        return 1
    rng = np.random.default_rng(0)
    b, t, vision, window = (8, 1024, 577, 256) if not args.tiny else (8, 64, 17, 16)
    full = np.ones((b, t), bool)
    left = full.copy()
    for row, real in enumerate(np.array([1.0, 0.7, 0.3, 0.0, 1.0, 1.0, 0.5, 0.9]) * t):
        left[row, :t - max(int(real), 1)] = False
    llama = case_arrays(rng, b, t, 32, 32, 128)
    compare = functools.partial(compare_kernels, implementation="xla" if args.tiny else "cudnn")
    cases = [
        compare("causal, no key mask", *llama, True, full, None, key_mask=False),
        compare("causal, all-valid key mask (as the decoder calls it)", *llama, True, full, None),
        compare("causal, left padding", *llama, True, left, None),
        compare(f"causal, window {window}", *llama, True, full, window),
        compare(f"causal, window {window}, left padding", *llama, True, left, window),
        compare("causal, 8 kv heads, left padding", *case_arrays(rng, b, t, 32, 8, 128), True, left, None),
        compare("vision tower (full, no mask)", *case_arrays(rng, b, vision, 16, 16, 64), False,
                np.ones((b, vision), bool), None, key_mask=False),
        compare("causal, odd length, left padding", *case_arrays(rng, b, t - 1, 32, 32, 128), True, left[:, 1:],
                None),
    ]
    device = jax.devices()[0]
    result = {"date": utc_now(), "device": device.device_kind, "tiny": args.tiny, "platform_version": device.client.platform_version,
              "versions": versions(("jax", "jaxlib")), "cases": cases}
    if args.preset:
        result["preset"] = preset_logits(args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
