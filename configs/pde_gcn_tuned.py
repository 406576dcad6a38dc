"""Winning hyperparameters of the Table 7 sweeps (selected on validation only).

Keys: (dataset, symmetric, precision); values: dotted config overrides.
Copied from the ``best_config.json`` of these runs (10 random-search trials
each, space ``gcn_quant``, 200 epochs, patience 60; tables in
``results/table7/``):

    python -m train.sweep --config=configs/pde_gcn.py:cora,sym,4w4a \
        --workdir=workdirs/sweep_cora_sym_4w4a --trials=10 --space=gcn_quant \
        --config.num_epochs=200 --config.patience=60
    (the same with cora,nonsym,4w4a)

Cora sym 4W4A: trial 1, val 79.4 (test 81.3).  Cora non-sym 4W4A: trial 6,
val 78.6 (test 78.6).  Only the 4W4A rows were swept (CPU budget); the FP and
4W8A rows of the same form, and CiteSeer, reuse these values, except:

CiteSeer sym 4W4A (session 3; with Cora's values it collapsed to a constant
prediction after one epoch, test 51.9%): trial 1 of

    python -m train.sweep --config=configs/pde_gcn.py:citeseer,sym,4w4a \
        --workdir=workdirs/sweep_citeseer_sym_4w4a --trials=8 \
        --space=gcn_quant --sweep_seed=1 --config.num_epochs=80 \
        --config.patience=30

val 70.8 (test 71.4); the sweep was stopped during trial 2 (CPU budget).  Its
alpha learning rate is 65x smaller than Cora's.

Session 4 (each choice made on validation accuracy; commands beside the
entries below): Cora sym FP takes its own sweep winner; the symmetric 4W8A
rows keep the float winner's h / lr / K lr / weight decay and take alpha init
and alpha lr from a sweep of those two only (space ``alpha``): at 8 bits the
clipping range, not the rounding, decides the accuracy.
"""

_CORA_SYM = {
    "model.alpha_init": 0.5019017913370494,
    "model.h": 0.6155329991455285,
    "optim.lr": 0.029857649470046866,
    "optim.lr_alpha": 0.007415575271957049,
    "optim.lr_kernel": 0.00012225031390095294,
    "optim.weight_decay": 0.0003769411094143323,
}
_CORA_NONSYM = {
    "model.alpha_init": 0.7811864238660753,
    "model.h": 0.4286337608806726,
    "optim.lr": 0.04942195977727243,
    "optim.lr_alpha": 0.0005195057914303153,
    "optim.lr_kernel": 0.0007380521197625403,
    "optim.weight_decay": 0.00010329452152278763,
}

# CiteSeer sym 4W4A until session 5 (see the end of this file); kept so the
# runs made with it stay reproducible by --config.* overrides.
_CITESEER_SYM_4W4A = {
    "model.alpha_init": 1.0543008649792276,
    "model.h": 1.1936194913497498,
    "optim.lr": 0.010886697954789687,
    "optim.lr_alpha": 0.00011353198378048274,
    "optim.lr_kernel": 0.00012565719918271567,
    "optim.weight_decay": 0.0002709107692899367,
}

TUNED = {}
for _dataset in ("cora", "citeseer"):
  for _precision in ("fp", "4w8a", "4w4a"):
    TUNED[(_dataset, True, _precision)] = dict(_CORA_SYM)
    TUNED[(_dataset, False, _precision)] = dict(_CORA_NONSYM)
# Cora sym FP, first pick (session 4): trial 7 of the 16-trial sweep
#
#   python -m train.sweep --config=configs/pde_gcn.py:cora,sym,fp \
#       --workdir=workdirs/sweep3_cora_sym_fp --trials=16 --space=gcn \
#       --sweep_seed=3
#
# val 80.2 (test 82.8); over 5 seeds its mean val is 80.2 against 79.9 for the
# values above (test 82.5 against 82.3).  (alpha values have no effect in FP:
# float rows do not clip.)
_CORA_SYM_FP_SWEEP3 = {
    "model.alpha_init": 0.6447505854659478,
    "model.h": 0.7732890493745123,
    "optim.lr": 0.032592686500189184,
    "optim.lr_alpha": 0.0018884973661618823,
    "optim.lr_kernel": 7.19690563982992e-05,
    "optim.weight_decay": 0.000525265963270023,
}
# Cora sym 4W8A (session 4): the first FP pick above with the alpha sweep's winner
#
#   python -m train.sweep --config=configs/pde_gcn.py:cora,sym,4w8a \
#       --workdir=workdirs/sweep_cora_sym_4w8a_alpha_t7 --trials=6 \
#       --space=alpha --sweep_seed=5 --config.model.h=0.7732890493745123 \
#       --config.optim.lr=0.032592686500189184 \
#       --config.optim.lr_kernel=7.19690563982992e-05 \
#       --config.optim.weight_decay=0.000525265963270023
#
# trial 1: val 81.4 (test 81.9); over 5 seeds mean val 80.56 against 80.20
# for the sym 4W4A winner used before (and 80.20 for the same alpha sweep on
# that winner's values: tied, and lost on validation loss).
TUNED[("cora", True, "4w8a")] = {
    **_CORA_SYM_FP_SWEEP3,
    "model.alpha_init": 1.4600084137710927,
    "optim.lr_alpha": 5.104634757272893e-05,
}
# Cora sym FP (session 4, final): trial 3 of a third sweep
#
#   python -m train.sweep --config=configs/pde_gcn.py:cora,sym,fp \
#       --workdir=workdirs/sweep7_cora_sym_fp --trials=10 --space=gcn \
#       --sweep_seed=7
#
# val 81.0 (test 81.1); over 5 seeds mean val 81.16 against 80.2 for the
# first pick above (test 82.7 against 82.5).  (A second sweep, --sweep_seed=6,
# 12 trials, found nothing above val 80.2.)
TUNED[("cora", True, "fp")] = {
    "model.alpha_init": 0.5576881226863817,
    "model.h": 0.6448724746712989,
    "optim.lr": 0.06679261242608431,
    "optim.lr_alpha": 3.024378218156116e-05,
    "optim.lr_kernel": 2.6953638321405757e-05,
    "optim.weight_decay": 0.00012836363510535754,
}
# CiteSeer sym 4W8A (session 4): Cora's symmetric values, which give 72.8 in
# float on CiteSeer, with the quantizers' alpha init and lr from the sweep
# (space "alpha", 4 trials, 80 epochs; results/table7/sweep_citeseer_sym_4w8a_alpha.md)
#
#   python -m train.sweep --config=configs/pde_gcn.py:citeseer,sym,4w8a \
#       --workdir=workdirs/sweep_citeseer_sym_4w8a_alpha --trials=4 \
#       --space=alpha --sweep_seed=4 --config.num_epochs=80 \
#       --config.patience=40 --config.model.h=0.6155329991455285 \
#       --config.optim.lr=0.029857649470046866 \
#       --config.optim.lr_kernel=0.00012225031390095294 \
#       --config.optim.weight_decay=0.0003769411094143323
#
# trial 0: val 74.6 (test 70.8), against val 71.0 (test 70.3) of the sym 4W4A
# winner used before.
TUNED[("citeseer", True, "4w8a")] = {
    **_CORA_SYM,
    "model.alpha_init": 3.5533217190422945,
    "optim.lr_alpha": 0.00018476527349204383,
}
# CiteSeer sym 4W4A (session 5): the same base as CiteSeer sym 4W8A (Cora's
# symmetric values) with alpha init / lr from a sweep of those two at 4 bits
# (results/table7/sweep_citeseer_sym_4w4a_alpha.md)
#
#   python -m train.sweep --config=configs/pde_gcn.py:citeseer,sym,4w4a \
#       --workdir=workdirs/sweep13_citeseer_sym_4w4a_alpha --trials=5 \
#       --space=alpha --sweep_seed=13 --config.num_epochs=80 \
#       --config.patience=40 --config.model.h=0.6155329991455285 \
#       --config.optim.lr=0.029857649470046866 \
#       --config.optim.lr_kernel=0.00012225031390095294 \
#       --config.optim.weight_decay=0.0003769411094143323
#
# trial 0: val 72.8 (test 70.8) at 80 epochs.  At 200 epochs, seeds 0 / 1 / 2:
# val 72.8 / 70.4 / 72.8 (mean 72.0) against 71.2 / 71.6 / 71.6 (mean 71.5)
# for the session-3 values (_CITESEER_SYM_4W4A above, the row's config until
# session 5, re-run with the current code), so it replaces them.
TUNED[("citeseer", True, "4w4a")] = {
    **_CORA_SYM,
    "model.alpha_init": 3.019673904839853,
    "optim.lr_alpha": 0.0013142804232594972,
}
