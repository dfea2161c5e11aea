"""Peak memory of minipsft's own loop: full fine-tuning vs LoRA, SFT vs PSFT, on the same model and
data, each run in its own process (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated).

    python benchmarks/lora_memory.py [--hidden 1024] [--layers 6] [--device cpu]

PSFT keeps pi_old as stored log-probs (no second model), so PSFT should cost what SFT costs; LoRA
keeps no gradients or AdamW state for the frozen weights.
"""
import argparse
import json
import subprocess
import sys

RUN = """
import json, resource, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
sys.path.insert(0, "tests")
from conftest import addition_rows, tiny_lm
from minipsft.model import CausalLM
from minipsft.train import TrainConfig, train
method, lora, hidden, layers, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
tok = tiny_lm(chat=False).tokenizer
config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                     pad_token_id=tok.pad_token_id)
lm = CausalLM(AutoModelForCausalLM.from_config(config), tok, device=device, dtype="float32")
if lora:
    lm.add_lora(r=lora)
n_params = sum(p.numel() for p in lm.model.parameters())
train(lm, lm.encode(addition_rows(32)), TrainConfig(method=method, epochs=1, lr=1e-4, batch_size=16,
                                                     minibatch_size=4, progress=False))
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "params_m": n_params / 1e6}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"| run | parameters | peak memory ({'RSS' if args.device == 'cpu' else 'allocated'}) |")
    print("|---|---|---|")
    for method, lora in (("sft", 0), ("psft", 0), ("sft", 16), ("psft", 16)):
        out = subprocess.run([sys.executable, "-c", RUN, method, str(lora), str(args.hidden),
                              str(args.layers), args.device], capture_output=True, text=True,
                             check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        label = f"{method.upper()} {'LoRA r=16' if lora else 'full'}"
        print(f"| {label} | {result['params_m']:.1f}M | {result['peak_mib']:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
