"""Model folders: written so every Hugging Face tool can load them, read back only when they are whole.

A model folder holds model.safetensors, config.json (with ``auto_map``), generation_config.json, the
tokenizer files and a copy of our configuration/modeling code, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where this package is not
installed. ``save_model_dir`` builds it in a temporary sibling and renames it into place
(``core.files.write_dir_atomically``): a killed process never leaves a half-written model.

``load_model_dir`` is the strict way back in, used by every command that takes a model folder. It
refuses, with one line naming the folder and the tensor, what ``from_pretrained`` would otherwise
accept with a warning and random weights: a missing tensor, an extra one, a shape that disagrees with
config.json, a truncated or unreadable weights file, a config that is not ours, a tokenizer.json that is
not GPT-2's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gpt2_scratch.core.errors import InputError, unicode_problem
from gpt2_scratch.core.files import path_kind, write_dir_atomically

from .tokenizer import ENDOFTEXT_ID, check_tokenizer_files, get_tokenizer

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ModelDirError(InputError):
    """A model folder that cannot be loaded as it is; the message names the folder and what is wrong."""


def save_model_dir(model, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                   prompt_style: str | None = None) -> Path:
    """Save ``model`` (and the GPT-2 tokenizer unless another is given) to ``out_dir``; return its path.

    ``prompt_style`` ("alpaca", "phi3") is recorded in config.json for an instruction-tuned model, so the
    chat command and the GGUF export wrap a message the way the model was trained; the tokenizer files
    get that style's chat template (``core.prompts.chat_template``), so ``apply_chat_template`` and
    transformers' pipelines build the training prompt too. A model whose config already records a style
    (one loaded from an instruction folder) keeps its template. An existing non-empty ``out_dir`` is
    refused unless ``overwrite``; then it is replaced only once the new folder is complete.
    """
    import copy

    from gpt2_scratch.core.prompts import PROMPT_STYLES, chat_template, prompt_pieces

    from . import register

    register()  # the folder gets auto_map and the modeling code (loads with trust_remote_code elsewhere)
    auto_map = getattr(model.config, "auto_map", None)
    if auto_map:
        # A config loaded from another head's folder (a classifier made from a causal LM) carries that
        # head's entry; keep only the config and this model's own Auto class.
        model.config.auto_map = {k: v for k, v in auto_map.items() if k in ("AutoConfig", type(model)._auto_class)}
    if prompt_style is not None:
        prompt_pieces(prompt_style)  # an unknown style: one line naming the known ones
        model.config.prompt_style = prompt_style
    tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else get_tokenizer()
    # The folder's tokenizer_config.json states this model's context (GPT-2's 1024 only at that size), so
    # transformers warns about a too-long text at the length that really is too long.
    tokenizer.model_max_length = model.config.max_position_embeddings
    style = getattr(model.config, "prompt_style", None)
    if style in PROMPT_STYLES:
        tokenizer.chat_template = chat_template(style)  # a copy: the caller's tokenizer is left as it was
    if getattr(model, "generation_config", None) is not None:
        # GPT-2 has no pad token; batched generation pads with <|endoftext|>, as the book does.
        model.generation_config.pad_token_id = ENDOFTEXT_ID
        model.generation_config.eos_token_id = ENDOFTEXT_ID
        model.generation_config.bos_token_id = ENDOFTEXT_ID

    def write(tmp_dir: Path) -> None:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)

    write_dir_atomically(out_dir, write, overwrite=overwrite)
    logger.info("saved model to %s", out_dir)
    return Path(out_dir)


def read_config(path: str | os.PathLike, *, flag: str = "--model") -> dict:
    """config.json of a model folder as a dict; a one-line error for a missing folder or a bad file."""
    path = Path(path).expanduser()
    kind = path_kind(path)
    if kind is not None:
        raise ModelDirError(f"{flag} {path} is {kind}, not a model folder; pass the folder that holds config.json")
    if not path.exists():
        raise ModelDirError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise ModelDirError(f"{flag} {path} is a file; pass the model folder that holds it")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{flag} {path}: no config.json, so it is not a model folder; pass a folder written "
                            "by save_pretrained, a training run or `gpt2-scratch convert`")
    return read_config_file(config_file)


def read_config_file(config_file: Path, error: type[InputError] = ModelDirError) -> dict:
    """A config.json's settings; one line naming the file when it is unreadable, not JSON, or not an object.

    Every reader of a model folder's config.json comes through here (``read_config``, the converters, which
    pass their own ``error`` class), so a list or a number where the object belongs is refused by name, not
    met later as an AttributeError.
    """
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise error(f"{config_file}: not valid JSON ({' '.join(str(err).split())}); the model folder is "
                    "damaged") from None
    except OSError as err:
        raise error(f"{config_file}: cannot read it ({err.strerror or err})") from None
    if not isinstance(config, dict):
        got = _JSON_NAMES.get(type(config), "a value")
        raise error(f"{config_file}: expected a JSON object of settings, got {got}; the model folder is damaged "
                    "(save or convert the model again)")
    return config


def is_our_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json says model_type gpt2-scratch."""
    try:
        return read_config(path).get("model_type") == "gpt2-scratch"
    except InputError:
        return False


def is_classifier_config(config: dict) -> bool:
    architectures = config.get("architectures")
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures)


# Fields of config.json that transformers reads, with the JSON type each must have: a list where an object
# belongs fails deep inside transformers, or is misread ("architectures": "X" is iterated letter by letter).
_CONFIG_TYPES = {"architectures": (list, "a list of class names"), "auto_map": (dict, "an object"),
                 "id2label": (dict, "an object"), "label2id": (dict, "an object"),
                 "task_specific_params": (dict, "an object"), "prompt_style": (str, "a string")}
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a config's dtype may name
_FLOAT_TENSOR_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the dtypes weights may have
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def check_config(path: str | os.PathLike, config: dict):
    """The GPT2ScratchConfig of ``path``'s config.json (``config``, as read), checked field by field.

    Raises a ModelDirError naming the file and the field for a value no model can be built from: a
    size that is zero, negative or not an integer, an emb_dim its heads do not divide, a negative
    layer_norm_epsilon, a string where a number or a boolean belongs, a list where an object belongs.
    """
    from .configuration_gpt2_scratch import GPT2ScratchConfig

    config_file = Path(path).expanduser() / "config.json"

    def bad(field: str, wanted: str):
        value = config[field]
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ModelDirError(f"{config_file}: {field} must be {wanted}, not {_JSON_NAMES.get(type(value), 'a value')} "
                             f"({shown}); fix config.json or save the model again")

    for field, (kind, wanted) in _CONFIG_TYPES.items():
        if config.get(field) is not None and not isinstance(config[field], kind):
            raise bad(field, wanted)
    if not all(isinstance(a, str) for a in config.get("architectures") or []):
        raise bad("architectures", "a list of class names")
    for field in ("dtype", "torch_dtype"):
        if config.get(field) is not None and config[field] not in _CONFIG_DTYPES:
            raise bad(field, f"one of {', '.join(_CONFIG_DTYPES)}")
    for field in _TOKEN_ID_FIELDS:
        value = config.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise bad(field, "a token id (an integer >= 0) or null")
    for target in sorted(set(GPT2ScratchConfig.attribute_map.values())):
        # transformers lets an alias (n_embd, hidden_size) silently override the key itself (emb_dim): two values
        # for one setting are refused by name, instead of as the weights' shapes disagreeing with one of them.
        aliases = sorted(alias for alias, aimed in GPT2ScratchConfig.attribute_map.items() if aimed == target)
        names = [name for name in (target, *aliases) if name in config]
        if len({json.dumps(config[name]) for name in names}) > 1:
            said = " and ".join(f"{name} {json.dumps(config[name])}" for name in names)
            raise ModelDirError(f"{config_file}: {said} disagree, though they name one setting ({target}); keep "
                                f"the right one and remove the other{'s' if len(names) > 2 else ''} from config.json")
    try:
        built = GPT2ScratchConfig.from_dict(config)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        message = " ".join(str(err).split()).removeprefix("GPT2ScratchConfig: ")
        aliases = [f"{alias} in config.json is {target}" for alias, target in GPT2ScratchConfig.attribute_map.items()
                   if alias in config and target in message]
        raise ModelDirError(f"{config_file}: {message}{' (' + '; '.join(aliases) + ')' if aliases else ''}; fix "
                            "config.json or save the model again") from None
    for field in _TOKEN_ID_FIELDS:
        value = config.get(field)
        if value is not None and value >= built.vocab_size:
            raise ModelDirError(f"{config_file}: {field} {value} is no token id: vocab_size is {built.vocab_size}; "
                                "fix config.json or save the model again")
    return built


def _check_weight_files(path: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Every weights file is present and its safetensors header covers the file (not truncated).

    Returns what the headers say, ``{tensor name: (shape, safetensors dtype, file)}``: no tensor is read.
    """
    from safetensors import SafetensorError, safe_open

    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
            files = [path / name for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelDirError(f"{path}/model.safetensors.index.json: not a safetensors index ({err})") from None
    else:
        raise ModelDirError(f"{path}: no model.safetensors; the model folder is incomplete (a run that stopped "
                            "before saving?)")
    found = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                for name in weights.keys():
                    piece = weights.get_slice(name)  # the header's entry: nothing is read or allocated
                    found[name] = (tuple(piece.get_shape()), piece.get_dtype(), file)
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"{file}: unreadable weights ({' '.join(str(err).split())}); the file is damaged "
                                "or truncated: save or download the model again") from None
    return found


def _check_tensors(path: Path, found: dict, config, cls) -> None:
    """The weights files' headers against what ``config`` builds, before any tensor is allocated.

    A config that claims a 30-million-token context would otherwise allocate gigabytes before its
    mismatch is found; a tensor of integers would be cast to floats in silence; an untied
    ``lm_head.weight`` under a config that ties the head would change what the model computes.
    """
    import torch

    with torch.device("meta"):  # shapes only: no memory
        expected = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
    tied = set(getattr(cls, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    for name in tied:
        expected.pop(name, None)  # save_pretrained leaves a tied head out: it is the token embedding
    single = path / WEIGHT_FILES[0]
    where = single if single.is_file() else path / WEIGHT_FILES[1]
    ending = "the folder's weights and config do not belong together (save or convert the model again)"

    def shape(dims) -> str:
        return "[" + ", ".join(map(str, dims)) + "]"

    for name, (dims, dtype, file) in sorted(found.items()):
        if dtype not in _FLOAT_TENSOR_DTYPES:
            raise ModelDirError(f"{file}: tensor '{name}' holds {dtype} values, not floating point (F32, F16 or "
                                "BF16): the file is damaged or not a model's weights; save or convert the model again")
    for kind, names, why in (("missing", sorted(set(expected) - set(found)), "the weights file lacks it"),
                             ("unexpected", sorted(set(found) - set(expected)), "config.json has no place for it")):
        if not names:
            continue
        name, more = min(names, key=lambda n: n not in tied), f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        if kind == "unexpected" and name in tied:
            raise ModelDirError(f"{found[name][2]}: unexpected tensor '{name}': a head of its own, but config.json "
                                "ties the head to the token embedding (tie_word_embeddings true); set "
                                "\"tie_word_embeddings\": false in config.json if the model was trained with its own "
                                "head, else save the model again")
        raise ModelDirError(f"{where if kind == 'missing' else found[name][2]}: {kind} tensor '{name}'{more}: {why}; "
                            f"{ending}")
    wrong = [name for name in sorted(expected) if found[name][0] != expected[name]]
    if wrong:
        name = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelDirError(f"{found[name][2]}: mismatched tensor '{name}'{more}: shape {shape(found[name][0])} in "
                            f"the file, {shape(expected[name])} by config.json; {ending}")


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the machine's RAM, or less under a cgroup (container) limit."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on every platform
        pass
    for cgroup_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limits.append(int(Path(cgroup_file).read_text().strip()))  # "max" (no limit) is not a number
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_fits_in_memory(config, what: str, fix: str) -> None:
    """Refuse, before allocating anything, a model whose float32 weights alone exceed this machine's memory.

    Counted on the meta device, so the count is the model's own; building it for real would otherwise
    run for a minute and take gigabytes before the allocator gives up with a traceback.
    """
    import torch

    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM

    limit = memory_limit_bytes()
    if limit is None:
        return
    with torch.device("meta"):  # shapes only: no memory
        n_params = GPT2ScratchForCausalLM(config).num_parameters()
    needed = 4 * n_params  # float32
    if needed > limit:
        raise InputError(f"{what}: {n_params:,} parameters need {needed / 2**30:,.1f} GiB in float32, more than "
                         f"the {limit / 2**30:,.1f} GiB of memory here; {fix}")


def load_model_dir(path: str | os.PathLike, *, head: str = "auto", flag: str = "--model", **kwargs):
    """Load our model folder strictly: every tensor present, none extra, every shape as config.json says.

    ``head`` is "causal-lm", "classifier", or "auto" (whichever the folder's config names). Extra keyword
    arguments go to ``from_pretrained`` (e.g. ``dtype``). Returns the model in eval mode.
    """
    import transformers
    from safetensors import SafetensorError

    from . import register
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification

    register()
    path = Path(path).expanduser()
    config = read_config(path, flag=flag)
    problem = unicode_problem(str(path), from_bytes=True)
    if problem:  # safetensors takes UTF-8 paths only: its message would call the weights damaged
        raise ModelDirError(f"{flag} {path}: the path is {problem}, which safetensors cannot open; rename the "
                            "folder (or a folder above it)")
    if config.get("model_type") != "gpt2-scratch":
        raise ModelDirError(f"{flag} {path} holds a {config.get('model_type')!r} model, not a gpt2-scratch one; "
                            "convert it first (`gpt2-scratch convert hf --from-dir DIR --out OUT`)")
    built = check_config(path, config)
    check_tokenizer_files(path, flag=flag)
    is_classifier = is_classifier_config(config)
    if head == "auto":
        head = "classifier" if is_classifier else "causal-lm"
    if head == "classifier" and not is_classifier:
        raise ModelDirError(f"{flag} {path} holds a language model with no trained classification head; train "
                            "one with `gpt2-scratch classify --model DIR`")
    if head == "causal-lm" and is_classifier:
        raise ModelDirError(f"{flag} {path} holds a text classifier, not a language model; use `gpt2-scratch "
                            "predict` with it, or pass a language model folder")
    found = _check_weight_files(path)
    cls = GPT2ScratchForSequenceClassification if head == "classifier" else GPT2ScratchForCausalLM
    _check_tensors(path, found, built, cls)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # we report what the load report would say, as one line
    transformers.utils.logging.disable_progress_bar()  # loading takes a blink
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelDirError(f"{flag} {path}: cannot load it ({' '.join(str(err).split())[:300]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    weights = path / WEIGHT_FILES[0]
    for kind, keys, why in (("missing", info["missing_keys"], "the weights file lacks it"),
                            ("unexpected", info["unexpected_keys"], "config.json has no place for it"),
                            ("mismatched", info["mismatched_keys"], "its shape disagrees with config.json")):
        if keys:
            name = sorted(keys)[0]
            name = name[0] if isinstance(name, tuple) else name
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelDirError(f"{weights}: {kind} tensor '{name}'{more}: {why}; the folder's weights and config "
                                "do not belong together (save or convert the model again)")
    return model.eval()


def check_finite(model, where: str) -> None:
    """Raise a Failure naming the first parameter that holds NaN or infinity (a diverged run)."""
    import torch

    from gpt2_scratch.core.errors import Failure

    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise Failure(f"{where}: parameter '{name}' holds NaN or infinite values (the training diverged); "
                          "refusing to use it")
