"""How the demo's kinds were chosen: what a tiny CPU model learns, on a validation split.

Plain torch, no Ray (a design study, not the pipeline): every candidate kind of problem gets the
same number of training rows (or, with mix=demo, the demo's own kinds and proportions); 25
correct rows per kind of the TRAINING stream form the validation split (val=extra, the default:
drawn from the training stream at twice the size, never among the rows trained on; val=carve:
carved out of those rows), and the held-out split is never looked at; a `tiny:small`-shaped
model, from random weights or after the `tiny-pre:small` pre-training itself
(`models.tiny.pretrain`, `pre` steps), is fine-tuned and scored by greedy exact match per kind at
a few step counts.

    python benchmarks/demo_design.py [pre=300] [steps=2000] [lr=2e-3] [evals=250,500,1000,2000]
    python benchmarks/demo_design.py mix=demo pre=400 steps=1000 lr=2e-3 threads=1 [seed=1]
      (the demo's own kinds and proportions: picks its pre-training, steps and learning rate;
      top=count_on:299 / facts=split:2 / props=half:0.05 try other number ranges, pre-training
      fact weights and kind proportions)

The figures it gave are in benchmarks/results/demo_cpu.md. Run it under the CPU lock on a shared
machine.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time

CANDIDATES = ("add_small,compare,count_on,add_2digit,subtract,double,digit_sum,half,"
              "last_digit,first_digit,reverse,add_1digit,min3")


def main() -> int:
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    import s2l_ray.demo.data as data
    from s2l_ray.models.tiny import PRESETS, build_tokenizer, pretrain

    args = dict(a.split("=", 1) for a in sys.argv[1:])
    kinds = args.get("kinds", CANDIDATES).split(",")
    pre_steps, steps = int(args.get("pre", 300)), int(args.get("steps", 2000))
    lr, bs = float(args.get("lr", 2e-3)), int(args.get("bs", 16))
    evals = sorted(int(x) for x in args.get("evals", "250,500,1000,2000").split(","))
    # mix=demo: the demo's own kinds and proportions, n_train rows (default 2000), to pick the
    # demo's steps and learning rate; otherwise equal shares of the candidate kinds.
    demo_mix = args.get("mix") == "demo"
    # top=count_on:199,double:99 and facts=after:2,plus:0.5: try other number ranges for the
    # small kinds and other pre-training mixes (the module globals the generators read).
    for key, table in (("top", data.NUMBER_TOP), ("facts", data.FACT_WEIGHTS),
                       ("props", data.KIND_PROPORTIONS)):
        for item in filter(None, args.get(key, "").split(",")):
            name, value = item.split(":")
            table[name] = type(table.get(name, 1.0))(float(value))
    torch.set_num_threads(int(args.get("threads", 2)))
    if demo_mix:
        kinds = list(data.KINDS)
    else:  # equal shares for every candidate kind (the generator reads these module globals)
        data.KIND_PROPORTIONS.clear()
        data.KIND_PROPORTIONS.update({k: 1 / len(kinds) for k in kinds})
        data.KINDS = tuple(kinds)
        for k in kinds:
            data.SOURCE_MIX.setdefault(k, {"drills": 1.0})

    tok_dir = tempfile.mkdtemp(prefix="demo-design-tok-")
    build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    cfg = GPTNeoXConfig(vocab_size=-(-len(tok) // 8) * 8, bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id, **PRESETS["small"])
    torch.manual_seed(int(args.get("seed", 0)))  # the model's init, pre-training and fine-tuning
    model = GPTNeoXForCausalLM(cfg)

    def batch(seqs: list[list[int]], n_prompt: list[int]) -> tuple:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (s, k) in enumerate(zip(seqs, n_prompt)):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            labels[i, k:len(s)] = torch.tensor(s[k:])
        return ids, mask, labels

    def train(seqs: list[list[int]], n_prompt: list[int], n_steps: int, size: int, peak: float,
              hook: object = None) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
        rng, order, warm = random.Random(args.get("seed", "0")), [], max(1, n_steps // 20)
        model.train()
        for step in range(n_steps):
            if len(order) < size:
                idx = list(range(len(seqs)))
                rng.shuffle(idx)
                order += idx
            b, order = order[:size], order[size:]
            for g in opt.param_groups:  # warmup, then linear decay to 10%
                g["lr"] = peak * min(1.0, (step + 1) / warm) * (
                    0.1 + 0.9 * (n_steps - step) / n_steps)
            ids, mask, labels = batch([seqs[i] for i in b], [n_prompt[i] for i in b])
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if hook is not None:
                hook(step + 1)

    if pre_steps:  # the tiny-pre:small pre-training itself (models.tiny.pretrain)
        t0 = time.time()
        losses = pretrain(model, tok, "small", steps=pre_steps)
        print(f"pre-training: {pre_steps} steps in {time.time() - t0:.0f} s, loss "
              f"{losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)

    n_train = int(args.get("n_train", 2000)) if demo_mix else 300 * len(kinds)
    n_val = int(args.get("n_val", 25))
    # val=extra (default): validation from the training stream at 2x the size, the training
    # rows exactly the demo's; val=carve: carved out of the n_train rows
    rows, val = data.validation_split(n_train, n_val, carve=args.get("val", "extra") == "carve",
                                      kinds=kinds)
    seqs, n_prompt = [], []
    for r in rows:
        p = tok(r["instruction"] + "\n")["input_ids"]
        seqs.append(p + tok(r["output"])["input_ids"] + [eos])
        n_prompt.append(len(p))

    def evaluate(step: int) -> None:
        if step not in evals:
            return
        model.eval()
        right = {k: 0 for k in kinds}
        tok.padding_side = "left"
        for i in range(0, len(val), 64):
            chunk = val[i:i + 64]
            enc = tok([r["instruction"] + "\n" for r in chunk], return_tensors="pt",
                      padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
            for r, gen in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
                answer = data.extract_final_answer(tok.decode(gen, skip_special_tokens=True))
                right[r["kind"]] += answer == data.extract_final_answer(r["output"])
        em = {k: round(right[k] / n_val, 2) for k in kinds}
        print(f"validation EM at step {step}: {json.dumps(em)} macro "
              f"{sum(em.values()) / len(em):.3f}", flush=True)
        model.train()

    t0 = time.time()
    train(seqs, n_prompt, steps, bs, lr, hook=evaluate)
    print(f"fine-tuning: {len(rows)} rows, {steps} steps in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
