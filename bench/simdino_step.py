"""SimDINO training steps beside the official code: the same tiny ViT weights, the same crops, N steps of both.

    git clone https://github.com/RobinWu218/SimDINO /tmp/SimDINO      # outside this repository
    python bench/simdino_step.py --official /tmp/SimDINO [--steps 4] [--batch 8] [--n-local 2]

The official side is the checkout's own `simdino/vision_transformer.py` (ViT, `DINOHead`), `utils.py`
(`MultiCropWrapper`, `clip_gradients`, `cancel_gradients_last_layer`, `get_params_groups`,
`cosine_scheduler`) and `main_dino.py`'s `MCRLoss`, driven by the per-step body of its `train_one_epoch`
on the CPU in float32 (no autocast; AdamW unfused). `main_dino.py` imports torchvision and wandb at the
top, which its loss does not use: empty stand-ins are registered under those names when they are missing.

Ours is `configs/simdino.py:official_vit=1` (the official ViT's erf GELU and torch-bicubic local-crop
position tables, DINO's schedule grid, per-layer clipping with a fused qkv), shrunk to the same tiny ViT,
the official student's initial weights copied in (`crate_jax.weights.dino`), through the engine's jitted
train step (`crate_jax.train.setup.Setup`). Printed per step: both losses and their difference; at the end
the largest parameter difference of the student and of the EMA teacher, relative to the parameter's scale.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from functools import partial
from pathlib import Path

import jax
import numpy as np


def official_modules(checkout: str):
    root = Path(checkout).expanduser().resolve() / "simdino"
    if not (root / "main_dino.py").is_file():
        raise SystemExit(f"{root.parent} is not a SimDINO checkout: simdino/main_dino.py is missing")
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.models", "wandb"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    tv = sys.modules["torchvision"]
    for sub in ("datasets", "transforms", "models"):
        if not hasattr(tv, sub):
            setattr(tv, sub, sys.modules[f"torchvision.{sub}"])
    sys.path.insert(0, str(root))
    return (importlib.import_module("vision_transformer"), importlib.import_module("utils"),
            importlib.import_module("main_dino"))


def head_params(sd: dict, prefix: str = "head.mlp.") -> dict:
    """The official projection MLP `head.mlp.{0,2,4}` as our `head/layers/{0,1,2}`."""
    idx = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
    return {"layers": {i: {"kernel": np.asarray(sd[f"{prefix}{j}.weight"]).T, "bias": np.asarray(sd[f"{prefix}{j}.bias"])}
                       for i, j in enumerate(idx)}}


def ours_from_official(sd: dict, cfg) -> dict:
    from crate_jax.weights import dino
    back = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {"backbone": dino.to_params(back, cfg.backbone, "official student"), "head": head_params(sd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="a SimDINO checkout (git clone https://github.com/RobinWu218/SimDINO)")
    ap.add_argument("--steps", type=int, default=4, help="training steps of both sides")
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--n-local", type=int, default=2, help="local crops per image (besides the 2 global ones)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, images and crops")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the official lr · batch / 256)")
    ap.add_argument("--ours-default", action="store_true",
                    help="control: our default ViT (tanh GELU, antialiased table resampling) and schedule grid")
    args = ap.parse_args(argv)
    import torch
    vits, utils, main_dino = official_modules(args.official)
    torch.manual_seed(args.seed)
    G, S, P, d, depth, heads, hidden, z = 32, 16, 8, 64, 2, 4, 64, 32
    B, V, T = args.batch, 2 + args.n_local, args.steps
    lr, min_lr, wd, wd_end, eps, m0, clip = args.lr, 1e-6, 0.04, 0.4, 0.5, 0.9, 3.0
    epochs, warm_epochs, it_per_epoch = 2, 1, max(1, T // 2)
    T = epochs * it_per_epoch

    # the official student and teacher (main_dino.py: vit, MultiCropWrapper(DINOHead), teacher = student)
    def vit():
        return vits.VisionTransformer(img_size=[G], patch_size=P, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=4,
                                      qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    student = utils.MultiCropWrapper(vit(), vits.DINOHead(d, 0, hidden_dim=hidden, bottleneck_dim=z))
    teacher = utils.MultiCropWrapper(vit(), vits.DINOHead(d, 0, hidden_dim=hidden, bottleneck_dim=z))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = main_dino.MCRLoss(V, 0, 1, eps, 1.0)
    opt = torch.optim.AdamW(utils.get_params_groups(student))
    lr_s = utils.cosine_scheduler(lr, min_lr, epochs, it_per_epoch, warmup_epochs=warm_epochs)
    wd_s = utils.cosine_scheduler(wd, wd_end, epochs, it_per_epoch)
    m_s = utils.cosine_scheduler(m0, 1, epochs, it_per_epoch)
    init_sd = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}

    # ours: configs/simdino.py with the official ViT, shrunk to the same network and schedules
    from crate_jax.configs import simdino
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.setup import Setup
    c = simdino.get_config(f"model=vit,variant=S/{P},batch={B},steps={T},epochs={epochs},source=digits,"
                           f"global_size={G},local_size={S},n_local={args.n_local},eps_sq={eps},"
                           f"official_vit={0 if args.ours_default else 1}")
    c.model.update(width=d, depth=depth, num_heads=heads, mlp_dim=4 * d, head_hidden=hidden, head_dim=z, drop_path=0.0)
    c.optim.update(lr=lr, min_lr=min_lr, warmup_steps=warm_epochs * it_per_epoch, wd=wd, wd_end=wd_end, clip=clip)
    c.teacher.momentum = m0
    c.optim.dino_schedule = not args.ours_default
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.evals = type(c.evals)()
    setup = Setup(c, make_mesh(c.mesh))
    state = setup.fresh_state(load_init=False)
    ours0 = ours_from_official(init_sd, setup.task.model_cfg)
    ours0 = jax.device_put(jax.tree.unflatten(jax.tree.structure(state["params"]), jax.tree.leaves(ours0)),
                           setup.param_sh)
    state = dict(state, params=ours0, extras={"teacher": jax.tree.map(lambda a: a.copy(), ours0)})
    state = jax.device_put(state, setup.state_sh)

    rng = np.random.default_rng(args.seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    to_torch = lambda u: torch.tensor(((u / 255.0 - mean) / std).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    print(f"{'step':>4} {'official loss':>14} {'ours':>14} {'|diff|':>9}")
    worst = 0.0
    for it in range(T):
        glob = rng.integers(0, 256, (B, 2, G, G, 3), dtype=np.uint8)
        loc = rng.integers(0, 256, (B, args.n_local, S, S, 3), dtype=np.uint8)
        images = [to_torch(glob[:, i]) for i in range(2)] + [to_torch(loc[:, i]) for i in range(args.n_local)]
        # the official step (train_one_epoch's body, float32, no scaler)
        for i, g in enumerate(opt.param_groups):
            g["lr"] = lr_s[it]
            if i == 0:
                g["weight_decay"] = wd_s[it]
        t_out = teacher(images[:2])
        s_out = student(images)
        loss, _, _ = loss_fn(s_out, t_out)
        opt.zero_grad()
        loss.backward()
        utils.clip_gradients(student, clip)
        utils.cancel_gradients_last_layer(0, student, 0)
        opt.step()
        with torch.no_grad():
            for pk, pq in zip(teacher.parameters(), student.parameters()):
                pk.mul_(m_s[it]).add_((1 - m_s[it]) * pq.detach())
        # ours
        batch = {"global": glob, "local": loc, "label": np.zeros((B,), np.int32)}
        state, metrics = setup.train_step(state, jax.device_put(batch, setup.batch_sh))
        ours_loss = float(metrics["train/loss"])
        worst = max(worst, abs(ours_loss - loss.item()))
        print(f"{it:>4} {loss.item():>14.8f} {ours_loss:>14.8f} {abs(ours_loss - loss.item()):>9.2e}")

    def rel_diff(theirs_sd, ours_tree):
        theirs = ours_from_official({k: v.detach().numpy() for k, v in theirs_sd.items()}, setup.task.model_cfg)
        ours_np = jax.tree.leaves(jax.tree.map(np.asarray, ours_tree))
        theirs = jax.tree.unflatten(jax.tree.structure(ours_tree), jax.tree.leaves(theirs))
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)), theirs,
                             jax.tree.unflatten(jax.tree.structure(ours_tree), ours_np))
        leaves = [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(diffs)]
        # The key bias has an exactly zero gradient (it adds the same logit to every key), so both sides update it
        # by Adam-normalised rounding noise, ±lr per step: it is reported on its own.
        key_bias = max(v for p, v in leaves if "['key']['bias']" in p)
        path, value = max(((p, v) for p, v in leaves if "['key']['bias']" not in p), key=lambda kv: kv[1])
        return value, path, key_bias

    print(f"after {T} steps: largest loss difference {worst:.2e}")
    for name, theirs_sd, ours_tree in (("student", student.state_dict(), state["params"]),
                                       ("teacher", teacher.state_dict(), state["extras"]["teacher"])):
        rel, at, kb = rel_diff(theirs_sd, ours_tree)
        print(f"  {name}: parameters differ by at most {rel:.2e} of their scale (at {at}); the attention key bias "
              f"(zero gradient, Adam-amplified noise) by {kb:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
