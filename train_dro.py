"""Stage 1 of RealAlign: Diffusion-DRO on real images (README 'Method: Stage 1').

    accelerate launch train_dro.py --pretrained_model ID_OR_PATH \
        --pairs pairs.csv --output_dir outputs/sd15/stage1

Three views of one network, each a LoRA adapter on the same frozen base
(common.py, section 3):
    learner (phi)  trainable
    ref            frozen copy of the learner at the start of the stage
    policy (theta) frozen sampling snapshot, re-synced from the learner every
                   --snapshot_every optimizer steps

One micro-batch of B captions c (dropped to "" with p = 0.2):
  1. policy: theta samples from c without guidance; per sample one point of
     its trajectory gives (x_t, t, theta's prediction = the target): a random
     step of the 20-step DPM-Solver++ grid (SD-1.5, per-sample offset), or,
     for SD-3, the point where the 10-step Euler trajectory lands exactly on a
     t drawn from the logit-normal (shift 3) law of paper Sec. 3 (README
     "Differences from the public code");
  2. real:   the real image of the same caption, noised at the same t with
     fresh noise; target eps (SD-1.5) or eps - x0 (SD-3);
  3. learner and ref each run ONE forward over the concatenated
     [real; policy] batch -> four per-sample errors;
  4. loss = diffusion_dro_loss (hinge on D, margin 0.001).
Only the real images of the pairs CSV are used here; the fakes are Stage 2's.
"""

import argparse

import torch

import common
from common import LEARNER, POLICY, REF


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RealAlign Stage 1: Diffusion-DRO on real images")
    common.add_training_args(parser, "dro")
    g = parser.add_argument_group("Diffusion-DRO")
    g.add_argument("--margin", type=common.non_negative_float, default=0.001, help="hinge margin m in max(D + m, 0)")
    g.add_argument("--caption_dropout", type=common.probability, default=0.2,
                   help="probability of training on the empty prompt (1 needs --allow_unusual)")
    g.add_argument("--sampler_steps", type=common.positive_int, default=None,
                   help="policy sampler steps: DPM-Solver++ (SD-1.5), flow-match Euler (SD-3.5-M) "
                        f"({common.backbone_default_help('sampler_steps', 'dro')})")
    g.add_argument("--snapshot_every", type=common.positive_int, default=16,
                   help="copy the learner into the sampling snapshot every N optimizer steps")
    g.add_argument("--points_per_trajectory", type=common.positive_int, default=1,
                   help="opt-in speed-up (README 'Throughput'): take K points of each policy trajectory instead "
                        "of one (SD-1.5: K distinct random steps; SD-3: K drawn timesteps), so a micro-batch of B samples runs B/K trajectories and "
                        "uses B/K real images (each at the K timesteps, fresh noise). Same expected loss, more "
                        "correlated samples. 1 = the paper's method")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.caption_dropout == 1 and not args.allow_unusual:
        raise common.UserError("--caption_dropout 1 drops every caption: Stage 1 would train an unconditional "
                               "model. Pass --allow_unusual if you mean it")
    accelerator, backbone, pairs, cache, grad_accum = common.prepare_training(args, "dro", need_fake=False)
    if args.train_batch_size % args.points_per_trajectory:
        raise common.UserError(f"--points_per_trajectory {args.points_per_trajectory} must divide "
                               f"--train_batch_size {args.train_batch_size}")
    roles = [LEARNER, REF, POLICY]
    lora_config = common.setup_lora_roles(backbone, roles, args.lora_rank, args.lora_alpha, args.init_lora,
                                            seed=args.seed)
    net = backbone.net

    def micro_batch_loss(rows, generator):
        n, K = args.train_batch_size, args.points_per_trajectory
        if rows is None:  # --benchmark_steps: random inputs of the right shapes
            x0, cond = common.random_inputs(backbone, n // K, args.resolution, generator, ["real"])
        else:  # n // K trajectories (K = 1: the paper's method, one per real image)
            x0, cond = common.sample_inputs(backbone, cache, rows[: n // K], generator, ["real"],
                                            caption_dropout=args.caption_dropout, flip=not args.no_flip)

        # 1. the policy side: a trajectory point of the frozen snapshot theta.
        #    Its prediction is the policy target (never the learner's own:
        #    that would make the policy term identically zero, README 'Differences from the public code').
        common.use_role(net, POLICY)
        sampling_start = common.benchmark_clock(args)
        calls_before, rows_before = backbone.network_calls, backbone.network_rows
        x_policy, t, policy_target = backbone.policy_trajectory_point(
            net, cond, args.resolution, args.sampler_steps, generator, points_per_trajectory=K)
        sampling_seconds = common.benchmark_clock(args) - sampling_start
        sampler_calls, sampler_rows = backbone.network_calls - calls_before, backbone.network_rows - rows_before
        if K > 1:  # each real image and caption serves the K points of its trajectory
            x0 = {side: value.repeat_interleave(K, dim=0) for side, value in x0.items()}
            cond = {key: value.repeat_interleave(K, dim=0) for key, value in cond.items()}
        x0_real = x0["real"]

        # 2. the expert side: the real image noised at the same timestep.
        noise = common.to_device(torch.randn(x0_real.shape, generator=generator), x0_real.device)
        x_real = backbone.add_noise(x0_real, noise, t)
        real_target = backbone.target(x0_real, noise)

        # 3. one learner and one reference forward over [real; policy].
        model_err, ref_err = common.learner_and_ref_errors(
            backbone, torch.cat([x_real, x_policy]), torch.cat([t, t]), common.cat_cond(cond, cond),
            torch.cat([real_target, policy_target]))

        # 4. the Diffusion-DRO hinge loss.
        loss, stats = common.diffusion_dro_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:],
                                                margin=args.margin)
        stats.update(model_err_real=model_err[:n].detach().mean(), model_err_policy=model_err[n:].detach().mean(),
                     ref_err_real=ref_err[:n].mean(), ref_err_policy=ref_err[n:].mean())
        if args.benchmark_steps:  # the policy sampler's time and evaluations (tests/benchmark.py)
            stats.update(sampling_seconds=sampling_seconds, sampler_calls=sampler_calls, sampler_rows=sampler_rows)
        return loss, stats

    def refresh_snapshot(step):
        # theta <- phi every --snapshot_every optimizer steps (README 'Method: Stage 1')
        if step % args.snapshot_every == 0:
            common.copy_role(net, LEARNER, POLICY)
            return {"snapshot_refreshed": 1}
        return {"snapshot_refreshed": 0}

    records = common.optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum,
                              micro_batch_loss, after_optimizer_step=refresh_snapshot)
    if args.benchmark_steps and accelerator.is_main_process:
        label = "stage1 (ours)" if args.points_per_trajectory == 1 else f"stage1 (ours-{args.points_per_trajectory}pts)"
        common.report_benchmark(label, args, backbone, records)
    accelerator.end_training()


if __name__ == "__main__":
    common.run_main(main)
