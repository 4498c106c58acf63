"""cProfile of Litespark's forward (+ backward) on a tiny batch of the 1B shape: where the host time goes.

Usage (GPU): python benchmarks/host_profile.py [--backward] [--top 40] [--config llama-1b] [--seq 16]
Prints the profile twice: by own time (tottime) and by cumulative time (what each caller costs with its callees).
"""
import argparse
import cProfile
import pstats


def main():
    import torch
    from transformers import AutoModelForCausalLM

    import litespark_hf
    from litespark_hf.efficiency.bench import CONFIGS, _hf_config

    p = argparse.ArgumentParser()
    p.add_argument("--backward", action="store_true")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--config", default="llama-1b", choices=sorted(CONFIGS))
    p.add_argument("--seq", type=int, default=16, help="tokens in the one-row batch (small: the host dominates)")
    p.add_argument("--steps", type=int, default=10, help="profiled calls")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py: needs a CUDA GPU (it profiles the host side of GPU launches)")
    hf = _hf_config(CONFIGS[a.config])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
    litespark_hf.apply(model)
    model.train()
    ids = torch.randint(0, hf.vocab_size, (1, a.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        if a.backward:
            loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    pr.disable()
    print(f"# {a.config}, 1 x {a.seq} tokens, {'forward + backward' if a.backward else 'forward'}, {a.steps} calls")
    for key in ("tottime", "cumulative"):
        pstats.Stats(pr).sort_stats(key).print_stats(a.top)


if __name__ == "__main__":
    main()
