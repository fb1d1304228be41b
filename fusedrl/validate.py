"""Checks of a :class:`~fusedrl.config.Config` that need other modules (registries,
the schedulers): one place, run by :func:`fusedrl.config.load_config` after the
dataclasses checked each field on its own. Each failure is a one-line
:class:`~fusedrl.config.ConfigError` naming the key and the value.

Checks that need the model (placements against its shape) run where the model config
is known, still before any worker starts (:func:`fusedrl.runtime.cluster.check_placements`).
"""

from __future__ import annotations

from fusedrl.config import Config, ConfigError


def check_config(config: Config) -> None:
    from fusedrl.tracking import check_loggers

    try:
        check_loggers(config.trainer.logger)
    except ValueError as e:
        raise ConfigError(f"config key trainer.logger={config.trainer.logger!r}: {e}") from None
    check_algorithm(config)  # first: uses_critic below needs a known estimator
    f = config.fusion
    from fusedrl.scheduler.interstage import available_policies

    if f.interstage_policy not in available_policies():
        raise ConfigError(f"config key fusion.interstage_policy={f.interstage_policy!r}: known "
                          f"policies: {', '.join(available_policies())}")
    if f.intrastage:
        if uses_critic(config):  # critic-free: nothing to fuse with (make_trainer says so)
            check_intrastage(config)
    check_interstage(config)
    check_partial(config)
    check_batch(config)


def uses_critic(config: Config) -> bool:
    """Whether the run has a critic: its advantage estimator reads values (``gae``)."""
    from fusedrl.algorithms import get_adv_estimator

    return bool(getattr(get_adv_estimator(config.algorithm.adv_estimator), "needs_critic",
                        False))


def check_batch(config: Config) -> None:
    """Mini-batches count samples: ``ppo.rollout_batch_size`` prompts x
    ``actor.rollout_n`` samples each must split into whole mini-batches."""
    p, n = config.ppo, config.actor.rollout_n
    if (p.rollout_batch_size * n) % p.mini_batch_size:
        raise ConfigError(f"config key ppo.mini_batch_size={p.mini_batch_size}: must divide the "
                          f"samples per iteration, ppo.rollout_batch_size x actor.rollout_n = "
                          f"{p.rollout_batch_size} x {n}")


def check_algorithm(config: Config) -> None:
    """``algorithm.adv_estimator`` against the estimator registry (a ``module:NAME``
    imports the module, which registers it), the actor's loss mode and KL estimator."""
    from fusedrl.algorithms import LOSS_AGG_MODES, get_adv_estimator
    from fusedrl.algorithms.ppo import KL_KINDS

    try:
        get_adv_estimator(config.algorithm.adv_estimator)
    except ValueError as e:
        raise ConfigError(f"config key algorithm.adv_estimator: {e}") from None
    a = config.actor
    if a.loss_agg_mode not in LOSS_AGG_MODES:
        raise ConfigError(f"config key actor.loss_agg_mode={a.loss_agg_mode!r}: known modes: "
                          f"{', '.join(LOSS_AGG_MODES)}")
    kinds = KL_KINDS + ("kl", "k2", "k3")
    if a.kl_loss_type not in kinds:
        raise ConfigError(f"config key actor.kl_loss_type={a.kl_loss_type!r}: known "
                          f"estimators: {', '.join(kinds)}")


def check_intrastage(config: Config) -> None:
    """``fusion.intrastage: true`` needs the Ray runtime and training placements whose
    stages pair up (:func:`fusedrl.pipeline.fused_plan.stage_map`)."""
    from fusedrl.pipeline.fused_plan import stage_map

    if config.cluster.devices == 1 and config.placement.is_trivial():
        raise ConfigError("config key fusion.intrastage=true: needs the Ray runtime "
                          "(cluster.devices > 1 or a non-trivial placement)")
    actor, critic = config.placement.of("actor_train"), config.placement.of("critic_train")
    try:
        stage_map(actor, critic)
    except ValueError as e:
        raise ConfigError(f"config key fusion.intrastage=true with placement.actor_train="
                          f"{actor} and placement.critic_train={critic}: {e}") from None


def interstage_support(config: Config) -> str | None:
    """``None`` when inter-stage fusion can drive this config's ``actor_gen``, else why
    not. Inference placements do not matter: the freed devices receive one-device
    copies of every inference model through the reallocation engine."""
    p = config.placement.of("actor_gen")
    if p.layout.tp != 1 or p.layout.pp != 1:
        return (f"placement.actor_gen={p}: step-level generation drives each instance on "
                "its own device (tp=1, pp=1)")
    if p.layout.dp < 2:
        return f"placement.actor_gen={p}: migration needs >= 2 generation instances (dp >= 2)"
    return None


def check_interstage(config: Config) -> None:
    if config.fusion.interstage and (why := interstage_support(config)) is not None:
        raise ConfigError(f"config key fusion.interstage=true: {why}")


def check_partial(config: Config) -> None:
    """Partial rollouts close the batch inside the rollout stage: the single-device one
    or the inter-stage fused one (:mod:`fusedrl.partial`), not the unfused Ray one."""
    from fusedrl.scheduler.partial import is_partial

    f = config.fusion
    if not is_partial(f.interstage_policy):
        return
    single = config.cluster.devices == 1 and config.placement.is_trivial()
    if not single and not interstage_enabled(config):
        raise ConfigError(f"config key fusion.interstage_policy={f.interstage_policy!r}: "
                          "partial rollouts on Ray need inter-stage fusion (fusion.interstage "
                          f"on, {interstage_support(config) or 'it is off'})")


def interstage_enabled(config: Config) -> bool:
    """``fusion.interstage`` resolved: unset means on where supported."""
    flag = config.fusion.interstage
    if flag is None:
        return interstage_support(config) is None and not (
            config.cluster.devices == 1 and config.placement.is_trivial())
    return bool(flag)
