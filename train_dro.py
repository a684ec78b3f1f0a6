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
     "Differences from the public code"); or, with --sd3_policy_point
     endpoint (the public SD-3.5-M trainer's structure), theta's 10-step
     sample taken to its end and noised at a drawn t;
  2. real:   the real image of the same caption, noised at the same t with
     fresh noise (endpoint: with the policy point's noise); target eps
     (SD-1.5) or eps - x0 (SD-3);
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
    g.add_argument("--margin", type=common.non_negative_float, default=0.001, help="hinge margin m in max(D + m, 0)")
    g.add_argument("--caption_dropout", type=common.probability, default=0.2,
                   help="probability of training on the empty prompt (1 needs --allow_unusual)")
    g.add_argument("--sampler_steps", type=common.positive_int, default=None,
                   help="policy sampler steps: DPM-Solver++ (SD-1.5), flow-match Euler (SD-3.5-M) "
                        f"({common.backbone_default_help('sampler_steps', 'dro')})")
    g.add_argument("--snapshot_every", type=common.positive_int, default=16,
                   help="copy the learner into the sampling snapshot every N optimizer steps")
    g.add_argument("--sampler_slots", type=common.positive_int, default=64,
                   help="rows per policy-sampler network call (README 'Throughput'): the trajectories of a snapshot "
                        "window run in this many fixed slots, a finished one replaced by the next; capped by the "
                        "window's trajectories. Sets the speed and memory, not the samples")
    g.add_argument("--points_per_trajectory", type=common.positive_int, default=1,
                   help="opt-in speed-up (README 'Throughput'): take K points of each policy trajectory instead "
                        "of one (SD-1.5: K distinct random steps; SD-3: K drawn timesteps), so a micro-batch of B samples runs B/K trajectories and "
                        "uses B/K real images (each at the K timesteps, fresh noise). Same expected loss, more "
                        "correlated samples. 1 = the paper's method")
    g.add_argument("--sd3_policy_point", choices=["trajectory", "endpoint"], default="trajectory",
                   help="SD-3 only: trajectory = the point of theta's Euler trajectory at a drawn t, the real latent "
                        "noised with fresh noise; endpoint = the public SD-3.5-M trainer's structure: theta's sample "
                        "taken to its end, then it and the real latent noised with ONE shared noise at one drawn t "
                        "(README 'Differences from the public code')")
    g.add_argument("--policy_target", choices=["snapshot", "learner"], default="snapshot",
                   help="target of the policy term: snapshot = theta's prediction (Diffusion-DRO). learner = a "
                        "diagnostic, the public SD-3.5-M trainer's effective objective: the learner's own prediction, "
                        "detached, so the policy term is exactly zero and has no gradient (add --snapshot_every 1 "
                        "to sample with the learner too, as that trainer does); for comparison only")
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
    if args.sd3_policy_point == "endpoint" and backbone.kind != "sd3":
        raise common.UserError("--sd3_policy_point endpoint is the public SD-3.5-M trainer's structure and needs an "
                               "SD-3 pipeline; SD-1.5 takes trajectory points (README 'Method: Stage 1')")
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

    def policy_cond(micro_batch, g):
        """The captions of the micro-batch's n // K policy trajectories (K = 1:
        the paper's method, one per real image), dropped to "" with p =
        --caption_dropout, drawn from the micro-batch's own "policy" generator."""
        if micro_batch.rows is None:  # --benchmark_steps: random embeddings of the right shapes
            return common.random_inputs(backbone, n // K, args.resolution, g, [])[1]
        prompt_ids = cache["prompt_index"][micro_batch.rows[: n // K]].clone()
        prompt_ids[torch.rand(n // K, generator=g) < args.caption_dropout] = 0  # index 0 = ""
        return common.cond_from_cache(cache, prompt_ids, backbone.device)

    def policy_request(micro_batch):
        """The micro-batch's policy trajectories: captions, initial noise and
        timesteps, drawn from its own generator, so that the sampler can draw
        them before the micro-batch's turn."""
        g = common.micro_batch_generator(args.seed, micro_batch.index, "policy")
        return backbone.policy_request(policy_cond(micro_batch, g), args.resolution, args.sampler_steps, g, K,
                                       key=micro_batch.index)

    def micro_batch_loss(micro_batch):
        # 1. the policy side: points of the frozen snapshot theta. Its
        #    prediction is the policy target (the learner's own would make the
        #    policy term identically zero, README 'Differences from the public
        #    code'; only the diagnostic --policy_target learner does that).
        common.use_role(net, POLICY)
        shared_noise = None
        if args.sd3_policy_point == "endpoint":  # the public SD-3.5-M trainer's structure
            g = common.micro_batch_generator(args.seed, micro_batch.index, "policy")
            cond = policy_cond(micro_batch, g)
            x_policy, t, policy_target, shared_noise = backbone.policy_endpoint_point(
                net, cond, args.resolution, args.sampler_steps, g, points_per_trajectory=K,
                with_prediction=args.policy_target == "snapshot")
        else:  # trajectory points, made in the sampler's fixed slots
            if sampler.idle():  # the first micro-batch of a snapshot window: theta is fixed up to its last step
                last = min(-(-micro_batch.step // args.snapshot_every) * args.snapshot_every, max_steps)
                sampler.start(common.micro_batches(args, accelerator, grad_accum, num_rows, micro_batch.step, last),
                              policy_request)
            request = sampler.next()
            assert request.key == micro_batch.index, "the sampler and the training loop disagree on the micro-batch"
            x_policy, t, policy_target = request.points()
            cond = request.cond

        # 2. the expert side: the real images of the same captions, noised at
        #    the same timesteps (each real image at the K points of its
        #    trajectory); endpoint: with the policy side's noise, too
        g = micro_batch.generator
        if micro_batch.rows is None:
            x0_real = common.to_device(torch.randn((n // K, *backbone.latent_shape(args.resolution)), generator=g),
                                       backbone.device)
        else:
            x0_real = common.sample_inputs(backbone, cache, micro_batch.rows[: n // K], g, ["real"],
                                           flip=not args.no_flip)[0]["real"]
        x0_real = x0_real.repeat_interleave(K, dim=0)
        cond = {key: value.repeat_interleave(K, dim=0) for key, value in cond.items()}
        noise = shared_noise
        if noise is None:
            noise = common.to_device(torch.randn(x0_real.shape, generator=g), x0_real.device)
        x_real = backbone.add_noise(x0_real, noise, t)
        real_target = backbone.target(x0_real, noise)

        # 3. one learner and one reference forward over [real; policy]
        #    (--policy_target learner: the policy rows' target is the learner's own prediction).
        own = args.policy_target == "learner"
        model_err, ref_err = common.learner_and_ref_errors(
            backbone, torch.cat([x_real, x_policy]), torch.cat([t, t]), common.cat_cond(cond, cond),
            real_target if own else torch.cat([real_target, policy_target]), own_target_from=n if own else None)

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
