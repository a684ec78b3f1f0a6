"""A plain reference for the Stage-1 policy sampler of common.py
(`Backbone.policy_request` + `PolicySampler`): one trajectory at a time, a
plain loop over its steps with one-row network calls, diffusers' own
schedulers for the update; no slots, no index plans. The tests compare the
fast sampler with it point by point (tests/test_common.py).

It makes the same draws from the generator, in the same order (the
sampler's docstring states the method; this file restates it):
  1. the initial noise of every trajectory, [n, *latent shape];
  2. SD-1.5: the step index of each of the K points (one randint per
     trajectory for K = 1, else K distinct steps by randperm per
     trajectory), then each trajectory's grid offset in [0, 1000 / steps);
     SD-3: the n * K timesteps of the points, from the training law
     (`Backbone.sample_timesteps`).
"""

import torch


@torch.no_grad()
def reference_points(bb, net, cond, resolution, num_steps, generator, K=1):
    """(x_t, t, prediction) per point, trajectory-major, as a list of
    (x_t [C, H, W], t, prediction [C, H, W]) tuples."""
    n = cond["prompt_embeds"].shape[0]
    noise = torch.randn((n, *bb.latent_shape(resolution)), generator=generator)
    if bb.is_flow:
        drawn = bb.sample_timesteps(n * K, generator, device="cpu").view(n, K).tolist()
        return [point for r in range(n)
                for point in _flow_trajectory(bb, net, _row(cond, r), noise[r : r + 1], drawn[r], num_steps)]
    if K == 1:
        steps = torch.randint(0, num_steps, (n, 1), generator=generator).tolist()
    else:
        steps = [torch.randperm(num_steps, generator=generator)[:K].tolist() for _ in range(n)]
    offsets = torch.randint(0, bb.num_train_timesteps // num_steps, (n,), generator=generator).tolist()
    return [point for r in range(n)
            for point in _dpm_solver_trajectory(bb, net, _row(cond, r), noise[r : r + 1], steps[r], offsets[r],
                                                num_steps)]


def _row(cond, r):
    return {key: value[r : r + 1] for key, value in cond.items()}


def _dpm_solver_trajectory(bb, net, cond, x, steps, offset, num_steps):
    """SD-1.5: diffusers' DPMSolverMultistepScheduler (DPM-Solver++, 2nd
    order, 1st order at the first step) on the trajectory's own grid
    offset + (1000 / num_steps) * (num_steps - 1 - i), run to its last point."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(bb.pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                        solver_order=2, lower_order_final=False)
    ratio = bb.num_train_timesteps // num_steps
    grid = [offset + ratio * (num_steps - 1 - i) for i in range(num_steps)]
    scheduler.set_timesteps(timesteps=grid)
    found = {}
    for i, t in enumerate(grid[: max(steps) + 1]):
        eps = bb.predict(net, x, torch.tensor([t]), cond).float()
        found[i] = (x[0].clone(), t, eps[0])
        x = scheduler.step(eps, t, x).prev_sample
    return [found[i] for i in steps]


def _flow_trajectory(bb, net, cond, x, points, num_steps):
    """SD-3: flow-match Euler on the trajectory's own stops: the scheduler's
    `num_steps`-step shifted grid down to its lowest drawn t (grid points
    within 1e-3 of a drawn t are that t), plus its drawn t's; diffusers'
    FlowMatchEulerDiscreteScheduler given those sigmas (shift 1: they are
    shifted already)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb.scheduler.set_timesteps(num_steps)
    grid = (bb.scheduler.sigmas[:-1] * bb.num_train_timesteps).tolist()
    stops = sorted({g for g in grid if g > min(points) and all(abs(g - p) > 1e-3 for p in points)} | set(points),
                   reverse=True)
    euler = FlowMatchEulerDiscreteScheduler.from_config(bb.pipe.scheduler.config, shift=1.0)
    euler.set_timesteps(sigmas=[s / bb.num_train_timesteps for s in stops])
    found = {}
    for i, t in enumerate(stops):
        velocity = bb.predict(net, x, torch.tensor([t]), cond).float()
        found[t] = (x[0].clone(), t, velocity[0])
        if i + 1 < len(stops):
            x = euler.step(velocity, euler.timesteps[i], x).prev_sample
    return [found[p] for p in points]
