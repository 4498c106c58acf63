"""cProfile of Litespark's forward (+ backward) on a tiny batch of the 1B shape: where the host time goes.

Usage (GPU): python benchmarks/host_profile.py [--backward] [--top 40]
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
    a = p.parse_args()
    hf = _hf_config(CONFIGS["llama-1b"])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
    litespark_hf.apply(model)
    model.train()
    ids = torch.randint(0, hf.vocab_size, (1, 16), device="cuda")

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
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
