"""The sampling and scoring settings of every hallucination detector, declared once.

:class:`EigenScoreSettings` holds each default and range check exactly once; the
sampling functions (:mod:`neurodetox.metrics.sampling`), ``neurodetox eval``
(its flags are the fields) and ``SeNDConfig``'s ``eigenscore_*`` fields all read
them from here. Sources: INSIDE (Chen et al., "INSIDE: LLMs' Internal States
Retain the Power of Hallucination Detection", ICLR 2024, arXiv 2402.03744, and
its code, github alibaba/eigenscore) for the sampling, the answer boundary, the
1-shot prompt and EigenScore; SeND (Mohammadzadeh et al., arXiv 2410.15460) for
EES; SAPLMA (Azaria & Mitchell, arXiv 2304.13734) for the hidden-state probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from neurodetox.core.checks import check_int, check_number
from neurodetox.core.errors import UserError

__all__ = [
    "DEFAULTS",
    "EigenScoreSettings",
    "POOLINGS",
    "PROBE_POSITIONS",
    "PROMPT_FORMATS",
    "STOP_INSIDE",
    "STOP_NONE",
    "parse_stop",
]

POOLINGS = ("last", "mean")
PROMPT_FORMATS = ("raw", "qa1shot", "chat")
PROBE_POSITIONS = ("prompt", "answer", "both")
#: ``stop`` value for INSIDE's answer boundary (line breaks, ``.`` and ``,``), derived from the tokenizer.
STOP_INSIDE = "inside"
#: ``stop`` value that turns the boundary off (answers end at EOS or the token cap only).
STOP_NONE = "none"


def parse_stop(stop) -> tuple[str, ...] | str:
    """Normalise a ``stop`` setting.

    Accepts ``"inside"`` (default boundary), ``"none"`` / ``None`` (no boundary), a string of
    user stop strings separated by ``|`` (``\\n``, ``\\r``, ``\\t`` escapes are decoded, e.g.
    ``"\\n|;"``), or a list/tuple of strings.

    Returns:
        ``"inside"``, ``"none"`` or a tuple of non-empty stop strings.

    Raises:
        UserError: an empty string, an empty piece (``"a||b"``) or a non-string item.
    """
    if stop is None:
        return STOP_NONE
    if isinstance(stop, str):
        low = stop.strip().lower()
        if low in (STOP_INSIDE, STOP_NONE):
            return low
        if stop == "":
            raise UserError(f"stop must be '{STOP_INSIDE}', '{STOP_NONE}' or stop strings separated by '|', got ''")
        pieces = stop.split("|")
    elif isinstance(stop, (list, tuple)):
        pieces = list(stop)
    else:
        raise UserError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    out = []
    for p in pieces:
        if not isinstance(p, str):
            raise UserError(f"stop strings must be strings, got {p!r}")
        p = p.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")
        if p == "":
            raise UserError(f"stop {stop!r} has an empty stop string; separate non-empty strings with '|'")
        out.append(p)
    return tuple(out)


@dataclass
class EigenScoreSettings:
    """Sampling and scoring settings of the hallucination detectors (INSIDE defaults, arXiv 2402.03744).

    Every field is a flag of ``neurodetox eval`` (``--k 10``) and, prefixed ``eigenscore_``, a
    field of :class:`neurodetox.send.SeNDConfig`.

    Attributes:
        k: sampled answers per prompt (INSIDE: 10), ≥ 2.
        temperature, top_p, top_k: sampling (INSIDE code: 0.5, 0.99, 10).
        max_new_tokens: answer length cap in tokens, ≥ 1.
        layer: decoder block whose output is embedded (``"middle"`` = INSIDE's
            ``hidden_states[len // 2]``).
        alpha: regulariser added to the eigenvalues (INSIDE: 1e-3), > 0.
        batch_size: prompts per ``generate`` call (each expands to ``k`` rows), ≥ 1.
        seed: sampling seed.
        pooling: ``"last"`` (INSIDE: the last answer token) or ``"mean"``.
        stop: the answer boundary: ``"inside"`` (default: every token whose text starts with
            a line break, and the ``.`` and ``,`` tokens, as INSIDE's generation), ``"none"``,
            or user stop strings separated by ``|`` (see :func:`parse_stop`).
        prompt_format: ``"raw"`` (the fact's completion prompt), ``"qa1shot"`` (INSIDE's
            1-shot question-answer template) or ``"chat"`` (the tokenizer's chat template).
        clip_percentile: feature-clipping percentile in percent (INSIDE paper: 0.2), in [0, 50).
        clip_bank_size: feature-clipping memory bank (INSIDE paper: 3000 tokens), ≥ 1.
        clip_layer: the clipped block (INSIDE paper: the penultimate).
        ees_tol: target 95 % error (nats) of the EES (KPM) per-prompt estimate, > 0.
        probe_layer: block whose output the hidden-state probe reads.
        probe_position: ``"prompt"`` (last prompt token), ``"answer"`` (last greedy-answer token
            before the stop) or ``"both"`` (the two concatenated).
        probe_min_labelled: fewest labelled probes the hidden-state probe is fitted on (≥ 4,
            with at least 2 of each outcome).

    Raises:
        UserError: (at construction) any field out of range, naming it and what is valid.
    """

    k: int = field(default=10, metadata={"help": "Sampled answers per prompt, >= 2 (INSIDE: 10)."})
    temperature: float = field(default=0.5, metadata={"help": "Sampling temperature, > 0 (INSIDE: 0.5)."})
    top_p: float = field(default=0.99, metadata={"help": "Nucleus sampling top-p in (0, 1] (INSIDE: 0.99)."})
    top_k: int = field(default=10, metadata={"help": "Top-k sampling, >= 0 (INSIDE code: 10; paper: 5)."})
    max_new_tokens: int = field(default=10, metadata={"help": "Answer length cap in tokens, >= 1."})
    layer: str = field(
        default="middle",
        metadata={"help": "Block whose output is embedded: 'middle' (INSIDE), 'penultimate', 'last' or an index."},
    )
    alpha: float = field(
        default=1e-3, metadata={"help": "EigenScore regulariser in (1/K) sum ln(lambda + alpha), > 0 (INSIDE: 1e-3)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (each expands to K rows)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    pooling: str = field(
        default="last", metadata={"help": "Embedding: 'last' answer token (INSIDE) or 'mean' over the answer."}
    )
    stop: str = field(
        default=STOP_INSIDE,
        metadata={
            "help": "Answer boundary: 'inside' (stop at tokens starting with a line break, and '.' and ',', as "
            "INSIDE), 'none', or your stop strings separated by '|' (e.g. '\\n|;')."
        },
    )
    prompt_format: str = field(
        default="raw",
        metadata={
            "help": "'raw' (the completion prompt), 'qa1shot' (INSIDE's 1-shot Q/A template) or 'chat' (the "
            "tokenizer's chat template)."
        },
    )
    clip_percentile: float = field(
        default=0.2, metadata={"help": "Feature clipping: lower percentile in percent, in [0, 50) (INSIDE: 0.2)."}
    )
    clip_bank_size: int = field(
        default=3000, metadata={"help": "Feature clipping: memory bank size in tokens (INSIDE: 3000)."}
    )
    clip_layer: str = field(default="penultimate", metadata={"help": "Feature clipping: the clipped block."})
    ees_tol: float = field(default=5e-3, metadata={"help": "EES (KPM): target 95%% error per prompt in nats, > 0."})
    probe_layer: str = field(default="middle", metadata={"help": "Hidden-state probe: the block it reads."})
    probe_position: str = field(
        default="both",
        metadata={"help": "Hidden-state probe input: 'prompt' (last prompt token), 'answer' or 'both'."},
    )
    probe_min_labelled: int = field(
        default=20, metadata={"help": "Hidden-state probe: fewest labelled probes it is fitted on (>= 4)."}
    )

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=2)
        check_number("temperature", self.temperature, minimum=0.0, min_inclusive=False)
        check_number("top_p", self.top_p, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int("top_k", self.top_k, minimum=0)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_number("alpha", self.alpha, minimum=0.0, min_inclusive=False)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=None)
        for name, valid in (
            ("pooling", POOLINGS),
            ("prompt_format", PROMPT_FORMATS),
            ("probe_position", PROBE_POSITIONS),
        ):
            if getattr(self, name) not in valid:
                raise UserError(f"{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        for name in ("layer", "clip_layer", "probe_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
                raise UserError(f"{name} must be a block name ('middle', 'penultimate', 'last') or index, got {v!r}")
        parse_stop(self.stop)
        check_number("clip_percentile", self.clip_percentile, minimum=0.0, maximum=50.0, max_inclusive=False)
        check_int("clip_bank_size", self.clip_bank_size, minimum=1)
        check_number("ees_tol", self.ees_tol, minimum=0.0, min_inclusive=False)
        check_int("probe_min_labelled", self.probe_min_labelled, minimum=4)

    def validate(self) -> None:
        """Re-run the range checks (after fields were changed in place).

        Raises:
            UserError: the first bad field.
        """
        self.__post_init__()

    def to_dict(self) -> dict:
        """The settings as a plain dict (for JSON summaries)."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field name, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help_of(cls, name: str) -> str:
        """The ``--help`` text of field ``name``."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)

    def sampling_config(self, **overrides):
        """A ``transformers.GenerationConfig`` for the ``k`` sampled answers (``do_sample=True``)."""
        from transformers import GenerationConfig

        kw = dict(
            do_sample=True,
            num_beams=1,
            num_return_sequences=self.k,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )
        kw.update(overrides)
        return GenerationConfig(**kw)


#: The defaults, read by every function signature that needs one of them.
DEFAULTS = EigenScoreSettings()
