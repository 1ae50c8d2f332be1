"""A tiny SeND run for the distributed tests; each rank dumps what it computed.

Launch with ``torchrun --nproc_per_node 2 tests/distributed/send_run.py --out DIR ...``
or plainly with ``python`` for the one-process reference. Writes
``DIR/rank{r}.json`` with the merged activation statistics, the selections
and the current masks as seen by that rank.
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for conftest helpers

from conftest import make_tiny_llama, make_tokenizer  # noqa: E402

from neurodetox.core.distributed import rank, world_size  # noqa: E402
from neurodetox.data.lm import tokenize_texts  # noqa: E402
from neurodetox.send import SeNDConfig, SeNDTrainer  # noqa: E402
from neurodetox.send.callbacks import ActivationStatsCallback, SensitiveNeuronDropoutCallback  # noqa: E402

WORDS = (
    "the capital of france is paris germany berlin italy rome spain madrid located in continent europe "
    "asia africa currency euro dollar yen japan tokyo"
).split()


def texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 10, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)) + " .")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stop-at", type=int, default=None, help="simulate a kill after this step")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--peft", action="store_true")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--site", default="mlp")
    p.add_argument("--layers", default="all")
    p.add_argument("--tracking", type=int, default=13, help="tracking items (odd on purpose: uneven shards)")
    a = p.parse_args()

    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    if a.peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"],
                lora_dropout=0.0,
                init_lora_weights="gaussian",
            ),
        )
    w = int(os.environ.get("WORLD_SIZE", "1"))
    args = SeNDConfig(
        output_dir=os.path.join(a.out, "run"),
        per_device_train_batch_size=a.global_batch // w,
        max_steps=a.steps,
        send_window_steps=2,
        send_site=a.site,
        send_layers=a.layers,
        send_drop_windows=2,
        send_tracking_batch_size=4,
        activation_stats_site="mlp",
        activation_stats_layers="all",
        save_strategy="steps",
        save_steps=4,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        seed=0,
        data_seed=0,
        eigenscore_num_prompts=0,
        deepspeed=a.deepspeed,
        gradient_checkpointing=a.gc,
        gradient_checkpointing_kwargs={"use_reentrant": True} if a.gc else None,
        dataloader_num_workers=0,
        ddp_backend="gloo" if w > 1 and not a.deepspeed and not os.environ.get("ACCELERATE_USE_DEEPSPEED") else None,
    )
    trainer = SeNDTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_texts(tok, texts(64, 1)),
        tracking_dataset=tokenize_texts(tok, texts(a.tracking, 2)),
        processing_class=tok,
    )
    if a.stop_at:
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == a.stop_at:
                    control.should_training_stop = True
                    control.should_save = False

        trainer.add_callback(Stop())
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    stats = trainer.callback(ActivationStatsCallback).merged_moments()
    send = trainer.callback(SensitiveNeuronDropoutCallback)
    out = {
        "rank": rank(),
        "world": world_size(),
        "stats": {k: {"count": m.count, "mean": m.mean.tolist(), "var": m.variance.tolist()} for k, m in stats.items()},
        "selections": send.selections,
        "current": send.current,
        "history_steps": list(send.history_steps),
        "last_history": {k: v.tolist() for k, v in send.history[-1].items()},
    }
    with open(os.path.join(a.out, f"rank{rank()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
