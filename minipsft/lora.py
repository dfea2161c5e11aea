"""LoRA through ``peft``: only the adapter trains; pi_old stays a set of stored log-probs, and
pi_ref (SFT+KL, ASFT, the anchored ablation) is the model with its adapter switched off, not a
copy (model.Reference)."""
__all__ = ["add_lora", "is_lora", "fresh_adapter"]


def add_lora(model, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
             target_modules="all-linear"):
    """``model`` wrapped with a fresh LoRA adapter. ``alpha`` defaults to ``2 * r``;
    ``target_modules`` is peft's (``"all-linear"``: every linear layer but the output head)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install peft (or minipsft[lora])") from None
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha or 2 * r,
                        lora_dropout=dropout, target_modules=target_modules)
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter")


def fresh_adapter(model) -> bool:
    """Whether ``model`` has a LoRA adapter still at its zero start (its output is the base's)."""
    return is_lora(model) and all(not p.any() for n, p in model.named_parameters()
                                  if "lora_B" in n)
