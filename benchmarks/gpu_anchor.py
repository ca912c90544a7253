# Verbatim copy of ../shared/bench/gpu_anchor.py, the team's plain-PyTorch anchor, kept in the
# working tree so that it travels to the GPU machine; benchmarks/gpu_check.py runs it as it is
# (a CPU dry run rewrites its shapes and device on the fly). Edit the original, then copy it here
# below the `# fmt: off` line (tests/test_gpu_check.py compares the two when ../shared is there).
# ruff: noqa
# fmt: off
"""Anchor measurements on a lent GPU: what plain PyTorch/transformers gets for a
Qwen2.5-VL-3B-shaped model (random weights, bf16). Prints a table."""
import time, json, os, sys
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
cfg = Qwen2_5_VLConfig(
    text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                     max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
torch.cuda.synchronize()
n_params = sum(p.numel() for p in model.parameters())
n_text = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
print(f"params total {n_params/1e9:.3f}B text {n_text/1e9:.3f}B build {time.time()-t0:.1f}s")
res = {}
# ---- generation throughput (text-only prompts, no EOS so full length) ----
model.eval()
for B, new in [(64, 256), (256, 256)]:
    ids = torch.randint(1000, 100000, (B, 128), device="cuda")
    att = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :16], attention_mask=att[:, :16], max_new_tokens=8, do_sample=True)
        torch.cuda.synchronize(); t = time.time()
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new, min_new_tokens=new,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        torch.cuda.synchronize(); dt = time.time() - t
    gen = (out.shape[1] - 128) * B
    res[f"hf_generate_B{B}_tok_per_s"] = gen / dt
    print(f"HF generate B={B} new={new}: {gen/dt:,.0f} tok/s ({dt:.1f}s)", flush=True)
# decode floor: each step reads all text weights once (bf16) -> 2*n_text bytes / 3.0e12 B/s
floor_step = 2 * n_text / 3.0e12
print(f"bandwidth floor per decode step ~{floor_step*1e3:.2f} ms -> B=256 bound ~{256/floor_step:,.0f} tok/s (weights only)")
# ---- training step throughput ----
model.train()
model.gradient_checkpointing_enable()
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
for B, L in [(8, 1024), (16, 1024)]:
    ids = torch.randint(1000, 100000, (B, L), device="cuda")
    times = []
    try:
        for i in range(4):
            torch.cuda.synchronize(); t = time.time()
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = out.logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss = -lp.mean()
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(); times.append(time.time() - t)
        dt = sorted(times[1:])[1]
        tok = B * L
        flops = 8 * n_text * tok  # fwd+bwd+recompute (grad ckpt)
        res[f"train_B{B}_L{L}_tok_per_s"] = tok / dt
        print(f"train B={B} L={L}: {tok/dt:,.0f} tok/s step {dt:.2f}s MFU(6N, vs 989T) {6*n_text*tok/dt/989e12:.1%} peak mem {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
    except torch.OutOfMemoryError as e:
        print("OOM at", B, L)
    del ids
    torch.cuda.empty_cache()
out_dir = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out_dir, "gpu_anchor.json"), "w"), indent=1)
