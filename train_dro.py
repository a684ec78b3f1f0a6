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
The policy trajectories run in fixed slots across the micro-batches of a
snapshot window (theta is frozen there; common.PolicySampler), each
micro-batch's draws from its own generator: the same samples, fewer idle rows.
"""

import argparse

import torch

import common
from common import LEARNER, POLICY, REF


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RealAlign Stage 1: Diffusion-DRO on real images")
    common.add_training_args(parser, "dro")
    g = parser.add_argument_group("Diffusion-DRO")
    g.add_argument("--margin", type=float, default=0.001, help="hinge margin m in max(D + m, 0)")
    g.add_argument("--caption_dropout", type=float, default=0.2, help="probability of training on the empty prompt")
    g.add_argument("--sampler_steps", type=int, default=None,
                   help="policy sampler steps: DPM-Solver++ (SD-1.5), flow-match Euler (SD-3.5-M) "
                        f"({common.backbone_default_help('sampler_steps', 'dro')})")
    g.add_argument("--snapshot_every", type=int, default=16,
                   help="copy the learner into the sampling snapshot every N optimizer steps")
    g.add_argument("--sampler_slots", type=int, default=64,
                   help="rows per policy-sampler network call (README 'Throughput'): the trajectories of a snapshot "
                        "window run in this many fixed slots, a finished one replaced by the next; capped by the "
                        "window's trajectories. Sets the speed and memory, not the samples")
    g.add_argument("--points_per_trajectory", type=int, default=1,
                   help="opt-in speed-up (README 'Throughput'): take K points of each policy trajectory instead "
                        "of one (SD-1.5: K distinct random steps; SD-3: K drawn timesteps), so a micro-batch of B samples runs B/K trajectories and "
                        "uses B/K real images (each at the K timesteps, fresh noise). Same expected loss, more "
                        "correlated samples. 1 = the paper's method")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.snapshot_every < 1 or args.sampler_slots < 1 or args.sampler_steps is not None and args.sampler_steps < 1:
        raise common.UserError("--snapshot_every, --sampler_slots and --sampler_steps must be >= 1")
    accelerator, backbone, pairs, cache, grad_accum = common.prepare_training(args, "dro", need_fake=False)
    if args.points_per_trajectory < 1 or args.train_batch_size % args.points_per_trajectory:
        raise common.UserError(f"--points_per_trajectory {args.points_per_trajectory} must be >= 1 and divide "
                               f"--train_batch_size {args.train_batch_size}")
    roles = [LEARNER, REF, POLICY]
    lora_config = common.setup_lora_roles(backbone, roles, args.lora_rank, args.lora_alpha, args.init_lora,
                                            seed=args.seed)
    net = backbone.net
    n, K = args.train_batch_size, args.points_per_trajectory
    num_rows = len(cache["prompt_index"]) if cache is not None else 0
    max_steps = args.benchmark_steps or args.max_train_steps
    # theta is frozen from one snapshot refresh to the next, so the policy
    # sampler runs that whole window's trajectories in fixed slots, starting
    # the next micro-batches' trajectories as slots free up (README "Throughput")
    trajectories = grad_accum * (n // K)  # per optimizer step, on this process
    sampler = common.PolicySampler(backbone, net, min(args.sampler_slots, args.snapshot_every * trajectories,
                                                      max_steps * trajectories))

    def policy_request(micro_batch):
        """The micro-batch's n // K policy trajectories (K = 1: the paper's
        method, one per real image): their captions, dropped to "" with p =
        --caption_dropout, initial noise and timesteps, drawn from the
        micro-batch's own "policy" generator, so that the sampler can draw
        them before the micro-batch's turn."""
        g = common.micro_batch_generator(args.seed, micro_batch.index, "policy")
        if micro_batch.rows is None:  # --benchmark_steps: random embeddings of the right shapes
            cond = common.random_inputs(backbone, n // K, args.resolution, g, [])[1]
        else:
            prompt_ids = cache["prompt_index"][micro_batch.rows[: n // K]].clone()
            prompt_ids[torch.rand(n // K, generator=g) < args.caption_dropout] = 0  # index 0 = ""
            cond = common.cond_from_cache(cache, prompt_ids, backbone.device)
        return backbone.policy_request(cond, args.resolution, args.sampler_steps, g, K, key=micro_batch.index)

    def micro_batch_loss(micro_batch):
        # 1. the policy side: trajectory points of the frozen snapshot theta.
        #    Its prediction is the policy target (never the learner's own:
        #    that would make the policy term identically zero, README 'Differences from the public code').
        common.use_role(net, POLICY)
        if sampler.idle():  # the first micro-batch of a snapshot window: theta is fixed up to its last step
            last = min(-(-micro_batch.step // args.snapshot_every) * args.snapshot_every, max_steps)
            sampler.start(common.micro_batches(args, accelerator, grad_accum, num_rows, micro_batch.step, last),
                          policy_request)
        request = sampler.next()
        assert request.key == micro_batch.index, "the sampler and the training loop disagree on the micro-batch"
        x_policy, t, policy_target = request.points()

        # 2. the expert side: the real images of the same captions, noised at
        #    the same timesteps (each real image at the K points of its trajectory)
        g = micro_batch.generator
        if micro_batch.rows is None:
            x0_real = common.to_device(torch.randn((n // K, *backbone.latent_shape(args.resolution)), generator=g),
                                       backbone.device)
        else:
            x0_real = common.sample_inputs(backbone, cache, micro_batch.rows[: n // K], g, ["real"],
                                           flip=not args.no_flip)[0]["real"]
        x0_real = x0_real.repeat_interleave(K, dim=0)
        cond = {key: value.repeat_interleave(K, dim=0) for key, value in request.cond.items()}
        noise = common.to_device(torch.randn(x0_real.shape, generator=g), x0_real.device)
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
        return loss, stats

    def refresh_snapshot(step):
        # theta <- phi every --snapshot_every optimizer steps (README 'Method: Stage 1')
        if step % args.snapshot_every == 0:
            common.copy_role(net, LEARNER, POLICY)
            return {"snapshot_refreshed": 1}
        return {"snapshot_refreshed": 0}

    common.optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum, micro_batch_loss,
                    after_optimizer_step=refresh_snapshot)
    accelerator.end_training()


if __name__ == "__main__":
    common.run_main(main)
