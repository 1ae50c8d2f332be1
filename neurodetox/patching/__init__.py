"""MINT neuron patching: find, ship, prove and undo the smallest fix of a wrong fact.

Gu, Aleti, Chen, Zhang, "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356 (``docs/methods.md``
§4–5). Data flows one way through the modules:

``failures`` (edits, teacher-forced failures on token ids) →
``direction`` (semantic delta via a cached Cholesky of ``G = W_Uᵀ W_U``) →
``locate`` (gradient × activation, contrastive, activation-only locators;
reference statistics) → ``neurons`` (LM-head decoding, entropy-neuron guard) →
``protect`` (optional reference protection) → ``mint`` (the repair loop, a
package: settings, plan, replay, repairer; :func:`repair`) → ``patchfile``
(:class:`PatchSet`: safetensors + JSON manifest, apply/revert in memory) →
``checkpoint`` (apply/verify/revert on HF checkpoint folders, atomically) →
``edit_metrics`` (success, generalisation, specificity, perplexity drift);
``pools`` builds the prompt sets; the command line is
:mod:`neurodetox.cli.patch` (``neurodetox patch ...``).

Typical use::

    from neurodetox.core.models import load_model
    from neurodetox.patching import repair, apply_to_checkpoint, bind_to_checkpoint

    model, tok = load_model("runs/demo/final")
    patch, report = repair(model, tok, [{"prompt": "The capital of Palau is", "target": "Melekeok"}])
    bind_to_checkpoint(patch, "runs/demo/final")   # hashes of the touched tensors
    patch.save("fix-palau")                         # fix-palau/patch.safetensors + manifest.json
    apply_to_checkpoint("runs/demo/final", patch, out="runs/demo/final-patched")
"""

from neurodetox.patching.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    apply_to_checkpoint,
    bind_to_checkpoint,
    checkpoint_states,
    copy_checkpoint,
    folder_sha256,
    inspect_checkpoint,
    revert_checkpoint,
    verify_checkpoint,
)
from neurodetox.patching.direction import SemanticSpace, semantic_space
from neurodetox.patching.edit_metrics import compare, evaluate_patch, measure_model, perplexity
from neurodetox.patching.failures import Edit, Failure, coerce_edits, encode_edit, find_failures, teacher_forced_argmax
from neurodetox.patching.locate import DEFAULT_REFERENCE_PROMPTS, LOCATORS, Candidate, locate, neuron_scores
from neurodetox.patching.mint import (
    UPDATE_RULES,
    EditResult,
    FailureResult,
    MintSettings,
    RepairReport,
    repair,
    update_rule,
)
from neurodetox.patching.neurons import (
    decode_neuron,
    decode_vector,
    entropy_neuron_scores,
    entropy_neurons,
    value_vector,
)
from neurodetox.patching.patchfile import ParamPatch, PatchError, PatchMismatchError, PatchSet, tensor_sha256
from neurodetox.patching.protect import ReferenceProtection

__all__ = [
    "ReferenceProtection",
    "Candidate",
    "CheckpointError",
    "CheckpointInfo",
    "DEFAULT_REFERENCE_PROMPTS",
    "Edit",
    "EditResult",
    "Failure",
    "FailureResult",
    "LOCATORS",
    "MintSettings",
    "ParamPatch",
    "PatchError",
    "PatchMismatchError",
    "PatchSet",
    "RepairReport",
    "SemanticSpace",
    "apply_to_checkpoint",
    "bind_to_checkpoint",
    "checkpoint_states",
    "coerce_edits",
    "compare",
    "copy_checkpoint",
    "decode_neuron",
    "decode_vector",
    "encode_edit",
    "entropy_neuron_scores",
    "entropy_neurons",
    "evaluate_patch",
    "find_failures",
    "folder_sha256",
    "inspect_checkpoint",
    "locate",
    "measure_model",
    "neuron_scores",
    "perplexity",
    "repair",
    "revert_checkpoint",
    "semantic_space",
    "tensor_sha256",
    "teacher_forced_argmax",
    "UPDATE_RULES",
    "update_rule",
    "value_vector",
    "verify_checkpoint",
]
