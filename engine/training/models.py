"""Models: the built-in tiny Llama and its tokenizer, loading a base, and the sft/policy/reward LoRA adapters.

All three adapters live on ONE frozen base (a peft model with three named adapters); the reward model
adds a scalar score head that reads the last hidden state. Trainable adapters stay float32 whatever the
base dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.rundir.checkpoints import adapter_file
from engine.training.activation_checkpointing import set_activation_checkpointing
from engine.training.gguf_base import GGUF_NOTE, GGUFError, dequantise, is_gguf_reference
from engine.training.lora_forward import install as install_lora_forward
from engine.training.row_chunks import INFERENCE_CHUNK_BYTES, inference_rows, row_chunks

ADAPTERS = ("sft", "policy", "reward")
BUILTIN_NOTE = "zopro-builtin.json"  # in a folder zopro built: how (size, seed, corpus)
BASE_NOTES = (BUILTIN_NOTE, GGUF_NOTE)  # a base folder that holds one was made by zopro
BUILTIN_SIZES = {
    # name: hidden, layers, heads, mlp
    "nano": (64, 2, 4, 256),
    "tiny": (128, 2, 4, 512),
    "small": (256, 4, 8, 1024),
    "base10m": (256, 8, 8, 1024),
    "base100m": (768, 12, 12, 3072),
}
BUILTIN_VOCAB = 512
BUILTIN_VERSION = 3  # bump when the build changes, so caches rebuild
PRETRAIN_STEPS = 300
TOKENIZER_TEXT_CHARS = 4000  # the built-in tokenizer and pre-training read at most this much of one text


class ModelError(RuntimeError):
    """A model that cannot be built or loaded; the message is one sentence for the user."""


def quiet_transformers() -> None:
    """transformers 5 prints load reports and progress bars; the CLI and the TUI want none of it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    # datasets reads these when it is imported (only a task from files or the hub needs it: importing it
    # here cost the embedded default 0.6 s); one already imported is told directly
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        with contextlib.suppress(Exception):
            datasets.utils.logging.set_verbosity_error()
            datasets.disable_progress_bars()


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZOPRO_CACHE", Path.home() / ".cache" / "zopro"))


# --- the built-in tiny model -------------------------------------------------------------------------------


def build_builtin(
    size: str,
    corpus: list[str],
    seed: int,
    cache_dir: Path,
    pretraining_text: list[str] | None = None,
    on_build: Callable[[str], None] | None = None,
) -> Path:
    """Build (once) a small Llama-style causal LM from a config with a byte-level BPE tokenizer trained on
    the task's text, briefly pre-train it (all weights) on the task's plain text so that, like a real
    base model, it already speaks the language, and save it with save_pretrained; returns the folder to
    load with from_pretrained. Deterministic from the seed; built under a temporary name, then renamed."""
    if size not in BUILTIN_SIZES:
        raise ModelError(
            f"unknown built-in model builtin:{size}; available: "
            + ", ".join(f"builtin:{s}" for s in BUILTIN_SIZES)
        )
    text = pretraining_text or []
    digest = hashlib.sha256("\n".join(corpus + ["--"] + text).encode()).hexdigest()[:12]
    target = cache_dir / "builtin" / f"{size}-seed{seed}-{digest}-v{BUILTIN_VERSION}"
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:  # before the minutes of building: the cache must take it
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as error:
        raise ModelError(
            f"the model cache {cache_dir} cannot be written ({error.strerror or error}); set ZOPRO_CACHE "
            "(or model.cache_dir) to a folder you can write"
        ) from None
    if on_build is not None:
        on_build(
            f"building the built-in model builtin:{size} on first use: a tokenizer and a small Llama trained "
            f"briefly on the task's text (tens of seconds on a CPU), cached in {target.parent} for later runs"
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((line[:TOKENIZER_TEXT_CHARS] for line in corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    hidden, layers, heads, mlp = BUILTIN_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if text:  # a huge cell of one's own data is cut here, never held whole
        pretrain(
            model, tokenizer, [line[:TOKENIZER_TEXT_CHARS] for line in text], seed=seed, steps=PRETRAIN_STEPS
        )
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILTIN_NOTE).write_text(
            json.dumps(
                {
                    "size": size,
                    "seed": seed,
                    "corpus_sha": digest,
                    "pretrain_steps": PRETRAIN_STEPS if text else 0,
                }
            )
        )
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"the model cache {cache_dir} cannot be written ({error.strerror or error}); set ZOPRO_CACHE "
            "(or model.cache_dir) to a folder you can write"
        ) from None
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pretrain(
    model: nn.Module,
    tokenizer,
    text: list[str],
    *,
    seed: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> float:
    """Next-token training of all weights on plain lines (each followed by EOS); returns the last loss. With
    gradients on also when the caller has them off (`zopro generate` rebuilding a built-in base)."""
    with torch.enable_grad():
        return _pretrain(model, tokenizer, text, seed=seed, steps=steps, batch_size=batch_size, lr=lr)


def _pretrain(model, tokenizer, text, *, seed: int, steps: int, batch_size: int, lr: float) -> float:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        order = torch.randint(len(text), (batch_size,), generator=gen).tolist()
        lines = [text[i] + tokenizer.eos_token for i in order]
        batch = tokenizer(lines, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


# --- loading a base and attaching adapters ------------------------------------------------------------------


@dataclass
class PreferenceModel:
    """One frozen base with the sft, policy and reward adapters and the reward model's score head."""

    model: nn.Module  # a peft PeftModel
    tokenizer: object
    score_head: nn.Linear
    device: torch.device
    base_path: str
    inference_chunk_bytes: int = INFERENCE_CHUNK_BYTES  # see inference_rows
    kept_bytes_per_token: int = 0  # activations a token keeps for the backward (set_activation_checkpointing)

    def use(self, adapter: str) -> None:
        """Make `adapter` the active (and the only trainable) adapter. A switch walks every module of the
        model (about a millisecond on the built-in tiny model, a thousand times a run); making the active
        adapter active again is skipped: nothing in zopro changes which parameters train between switches."""
        if self.model.active_adapter != adapter:
            self.model.set_adapter(adapter)  # PeftModel keeps its own record of the active adapter

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        previous = self.model.active_adapter
        self.use(name)
        try:
            yield
        finally:
            self.use(previous)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of one adapter, by their full peft names."""
        marker = f".{name}."
        return {n: p for n, p in self.model.named_parameters() if marker in n and "lora_" in n}

    def copy_adapter(self, source: str, target: str) -> None:
        """Make adapter `target` equal to `source` (in place: optimisers keep their parameters)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=source, save_embedding_layers=False)
        set_peft_model_state_dict(self.model, state, adapter_name=target)

    @property
    def decoder(self) -> nn.Module:
        """The base's transformer body (embeddings, layers, final norm) with the adapters injected."""
        return self.model.get_base_model().get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        """The base's output layer (a LoRA layer when the adapters target it; the active adapter applies)."""
        return self.model.get_base_model().get_output_embeddings()

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype of the frozen base (its input embeddings); the adapters are float32 whatever it is."""
        return self.model.get_base_model().get_input_embeddings().weight.dtype

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states of the base (with the active adapter), without the lm_head. Without autograd
        on a float32 base, each adapted layer multiplies by its merged weight (`merged_lora`), and on the CPU
        the rows run a chunk at a time (`inference_rows`)."""
        rows = input_ids.shape[0]
        most = rows if torch.is_grad_enabled() else inference_rows(self, input_ids.shape[1])
        with self.merged_lora():
            parts = [
                self.decoder(
                    input_ids=input_ids[part],
                    attention_mask=attention_mask[part],
                    position_ids=position_ids[part],
                    use_cache=False,
                ).last_hidden_state
                for part in row_chunks(rows, most)
            ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @contextlib.contextmanager
    def merged_lora(self, keep: bool = False) -> Iterator[None]:
        """Inside, without autograd and on a float32 base, each LoRA layer of the body computes
        x (W + s B A)^T with a temporary merged weight (one layer's at a time) instead of xW^T + s (xA^T)B^T:
        the same function to float32 rounding, at a plain layer's cost once a pass has many more tokens than
        the rank. The weights themselves are never changed, so nothing drifts; the active adapter (or none,
        under disable_adapter) is read at each call. Autograd passes and low-precision bases do not merge
        (in bf16 a merged perturbation would round away). The layers' forward: engine/training/lora_forward.py.

        `keep` (for decoding, one token a call, with the adapters fixed inside): each merged weight, the
        lm_head's included, is made once and kept until the end, when all of them fit in
        MERGED_KEEP_BYTES; otherwise peft's path stays (merging per decode step would cost more)."""
        if torch.is_grad_enabled() or self.base_dtype != torch.float32:
            yield
            return
        from peft.tuners.lora import Linear as LoraLinear

        head = self.lm_head  # the head runs in chunks of rows: merging it per chunk would cost more
        patched = [m for m in self.decoder.modules() if isinstance(m, LoraLinear) and m is not head]
        if keep:
            patched += [head] if isinstance(head, LoraLinear) else []
            if sum(m.get_base_layer().weight.numel() * 4 for m in patched) > MERGED_KEEP_BYTES:
                yield
                return
        for module in patched:
            module.zopro_merging = keep
        try:
            yield
        finally:
            for module in patched:
                module.zopro_merging = None
                vars(module).pop("zopro_merged_weight", None)


MERGED_KEEP_BYTES = 512 * 2**20


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device = 'cuda' but no CUDA device is available; use device = 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_base(
    base: str,
    corpus: list[str],
    seed: int,
    cache_dir: str,
    pretraining_text: list[str] | None = None,
    on_build: Callable[[str], None] | None = None,
) -> str:
    """A builtin:NAME becomes the folder it was built into, a GGUF file (a path or pkg:PACKAGE/FILE.gguf)
    the folder it was dequantised into; other names are passed to from_pretrained."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if base.startswith("builtin:"):
        return str(build_builtin(base.split(":", 1)[1], corpus, seed, cache, pretraining_text, on_build))
    if is_gguf_reference(base):
        try:
            return str(dequantise(base, cache, on_build))
        except GGUFError as error:
            raise ModelError(str(error)) from None
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(
                f"model.base = {base!r} is a folder without config.json; point it at a saved model"
            )
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or base.endswith("/"):
        raise ModelError(f"model.base = {base!r}: no such folder (a hub id looks like org/name)")
    return base  # a hub id: from_pretrained downloads it when there is a network


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the model's output layer shares its weight with the input embedding (SmolLM2, Llama 3.2)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def load_preference_model(
    base: str,
    *,
    dtype: str,
    device: torch.device,
    lora_rank: int,
    lora_alpha: float,
    target_modules: list[str],
    seed: int,
    gradient_checkpointing: str = "auto",
) -> PreferenceModel:
    """Load the base with from_pretrained and attach sft, policy and reward LoRA adapters (same modules and
    rank, so their tensors pair up key by key) plus a float32 score head. LoRA init is seeded.
    `gradient_checkpointing`: see set_activation_checkpointing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    except Exception as error:  # noqa: BLE001 - a damaged model folder: truncated weights, a config that is a list
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ""
        if Path(base).parent.name == "builtin" and (Path(base) / BUILTIN_NOTE).exists():
            hint = f"; the built-in model cached there is damaged: remove {base} and it is built again"
        elif Path(base).is_dir():
            hint = "; the model folder is damaged (a copy or download cut short?)"
        raise ModelError(f"cannot load model.base = {base!r}: {first[:200]}{hint}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    base_model.config.use_cache = True
    modules = "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    if tied_embeddings(base_model) and isinstance(modules, list) and "lm_head" in modules:
        # the output layer IS the input embedding here: adapting it would change both (peft warns), and a
        # merged export could no longer keep them tied; the other layers carry the adapter
        modules.remove("lm_head")
    lora = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=modules, bias="none"
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A matrices are drawn from the global RNG
            model = get_peft_model(base_model, lora, adapter_name="sft")
            model.add_adapter("policy", lora)
            model.add_adapter("reward", lora)
            head = nn.Linear(base_model.config.hidden_size, 1)
            nn.init.normal_(head.weight, std=1.0 / (base_model.config.hidden_size + 1))
            nn.init.zeros_(head.bias)
    except ValueError as error:
        raise ModelError(
            f"model.target_modules = {target_modules!r} does not fit {base!r}: {error}"
        ) from None
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    model.to(device)
    head.to(device)
    install_lora_forward(model)
    pm = PreferenceModel(model=model, tokenizer=tokenizer, score_head=head, device=device, base_path=base)
    pm.copy_adapter("sft", "policy")  # all start identical; SFT trains sft, policy then copies it
    pm.use("sft")
    try:
        set_activation_checkpointing(pm, gradient_checkpointing)
    except ValueError as error:
        raise ModelError(str(error)) from None
    return pm


# --- saving and loading adapters ----------------------------------------------------------------------------


def save_adapters(pm: PreferenceModel, folder: Path) -> None:
    """adapters/<name>/ in plain peft layout (loadable with PeftModel.from_pretrained), plus the score head."""
    from safetensors.torch import save_file

    pm.model.save_pretrained(
        folder / "adapters", selected_adapters=list(ADAPTERS), save_embedding_layers=False
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in pm.score_head.state_dict().items()},
        str(folder / "score_head.safetensors"),
    )


def read_adapters(folder: Path, device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """The adapter and score-head tensors of a checkpoint folder, read but not applied (safetensors only)."""
    from safetensors.torch import load_file

    weights = {name: load_file(str(adapter_file(folder, name)), device=str(device)) for name in ADAPTERS}
    weights["score_head"] = load_file(str(folder / "score_head.safetensors"), device=str(device))
    return weights


def apply_adapters(pm: PreferenceModel, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    from peft.utils import set_peft_model_state_dict

    for name in ADAPTERS:
        set_peft_model_state_dict(pm.model, weights[name], adapter_name=name)
    pm.score_head.load_state_dict(weights["score_head"])
