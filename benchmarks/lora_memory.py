"""Peak memory of minipsft's own loop: full fine-tuning vs LoRA, SFT vs PSFT, on the same model and
data, each run in its own process (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated).

    python benchmarks/lora_memory.py [--hidden 1024] [--layers 6] [--device cpu]
    python benchmarks/lora_memory.py --qwen-0.5b --device cuda   # Qwen2.5-0.5B's shape, bf16

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
method, lora, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
shape = json.loads(sys.argv[4])
torch.manual_seed(0)
tok = tiny_lm(chat=False).tokenizer
config = Qwen2Config(**shape, pad_token_id=tok.pad_token_id)
dtype = torch.bfloat16 if device == "cuda" else None  # float32 on CPU, bfloat16 on a GPU
with torch.device(device):  # built in that dtype, on the device
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
lm = CausalLM(model, tok, device=device)
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()  # the training's peak, not the model's construction
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
    ap.add_argument("--qwen-0.5b", dest="qwen", action="store_true",
                    help="Qwen2.5-0.5B's shape (151,936-token vocabulary, 24 layers)")
    args = ap.parse_args()
    shape = dict(vocab_size=64, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2)
    if args.qwen:
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     tie_word_embeddings=True)
    print(f"| run | parameters | peak memory ({'RSS' if args.device == 'cpu' else 'allocated'}) |")
    print("|---|---|---|")
    for method, lora in (("sft", 0), ("psft", 0), ("sft", 16), ("psft", 16)):
        out = subprocess.run([sys.executable, "-c", RUN, method, str(lora), args.device,
                              json.dumps(shape)], capture_output=True, text=True,
                             check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        label = f"{method.upper()} {'LoRA r=16' if lora else 'full'}"
        print(f"| {label} | {result['params_m']:.1f}M | {result['peak_mib']:,.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    main()
