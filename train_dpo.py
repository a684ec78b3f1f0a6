"""Stage 2 of RealAlign: Diffusion-DPO on (real, inpainted) pairs (README 'Method: Stage 2').

    accelerate launch train_dpo.py --pretrained_model ID_OR_PATH \
        --pairs pairs.csv --init_lora outputs/sd15/stage1/checkpoint-1600 \
        --output_dir outputs/sd15/stage2

Warm start: the Stage-1 LoRA (its EMA weights) initialises the learner and a
frozen copy of it is the reference, so the reference is the Stage-1 model,
not the base model. Without --init_lora this is plain Diffusion-DPO from the
base model (the paper's baseline row), reference = base.

One micro-batch of B pairs (w = real photo, l = its inpainted copy):
  1. w and l share one crop, one flip, one noise draw and one timestep: the
     only difference between the two noisy inputs is the inpainted region;
  2. learner and reference each run ONE forward over [w; l];
  3. loss = diffusion_dpo_loss with beta = 2000 (SD-1.5) or 100 (SD-3.5-M).
"""

import argparse

import torch

import common
from common import LEARNER, REF


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RealAlign Stage 2: Diffusion-DPO on real vs inpainted pairs")
    common.add_training_args(parser, "dpo")
    g = parser.add_argument_group("Diffusion-DPO")
    g.add_argument("--beta", type=common.positive_float, default=None,
                   help=f"KL strength beta ({common.backbone_default_help('beta', 'dpo')})")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    accelerator, backbone, pairs, cache, grad_accum = common.prepare_training(args, "dpo", need_fake=True)
    roles = [LEARNER, REF]
    lora_config = common.setup_lora_roles(backbone, roles, args.lora_rank, args.lora_alpha, args.init_lora,
                                            seed=args.seed)

    def micro_batch_loss(micro_batch):
        n, generator = args.train_batch_size, micro_batch.generator
        if micro_batch.rows is None:  # --benchmark_steps: random inputs of the right shapes
            x0, cond = common.random_inputs(backbone, n, args.resolution, generator, ["real", "fake"])
        else:  # no caption dropout in Stage 2 (README 'Method: Stage 2')
            x0, cond = common.sample_inputs(backbone, cache, micro_batch.rows, generator, ["real", "fake"],
                                            flip=not args.no_flip)
        x0_win, x0_lose = x0["real"], x0["fake"]

        # 1. one noise and one timestep per pair, shared by winner and loser
        noise = common.to_device(torch.randn(x0_win.shape, generator=generator), x0_win.device)
        t = backbone.sample_timesteps(n, generator)
        x_t = torch.cat([backbone.add_noise(x0_win, noise, t), backbone.add_noise(x0_lose, noise, t)])
        target = torch.cat([backbone.target(x0_win, noise), backbone.target(x0_lose, noise)])

        # 2. one learner and one reference forward over [w; l]
        model_err, ref_err = common.learner_and_ref_errors(
            backbone, x_t, torch.cat([t, t]), common.cat_cond(cond, cond), target)

        # 3. the Diffusion-DPO loss
        loss, stats = common.diffusion_dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:],
                                                beta=args.beta)
        stats.update(model_err_w=model_err[:n].detach().mean(), model_err_l=model_err[n:].detach().mean(),
                     ref_err_w=ref_err[:n].mean(), ref_err_l=ref_err[n:].mean())
        return loss, stats

    common.optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum, micro_batch_loss)
    accelerator.end_training()


if __name__ == "__main__":
    common.run_main(main)
