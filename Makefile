# The study as files: each run's finished metrics.json is a target, so a finished run is skipped, an
# interrupted one resumed (--resume when its checkpoint exists), and 08 waits for 07 of its seed.
#   make quick-study DATA=../shared/data      every script's --quick run, then the report   (minutes, CPU)
#   make study SEEDS="0 1 2" DATA=data         every script on every seed, then the report    (a GPU box)
#   make -j4 study ...                         independent runs side by side
#   make study RUN="torchrun --nproc-per-node 4"   each run on 4 GPUs
#   make report | make test-fast | make test
#   make study RESTART=1                       runs interrupted with other flags start over (--restart), not --resume
PY    ?= python
RUN   ?= $(PY)
DATA  ?= data
R     ?= results
SEEDS ?= 0 1 2
FLAGS ?=
EXPERIMENTS := 01_base 02_no_bn 03_label_smoothing 04_augmentation 05_transfer 06_adam 07_reverse_mnist \
               08_finetune_svhn 09_domain_generalization
# A quick 05 without torchvision's ImageNet weights in its cache checks the adapter from a random init.
WEIGHTS := $(wildcard $(or $(TORCH_HOME),$(HOME)/.cache/torch)/hub/checkpoints/resnet18-f37072fd.pth)

# The Makefile computes where each run writes: flags that move a run's folder would make it retrain forever,
# or let one experiment overwrite another's finished run.
MOVING := $(filter --name% --seed% --results-dir% --quick --no-quick --evaluate% --resume --restart,$(FLAGS))
$(if $(MOVING),$(error FLAGS may not hold $(MOVING): the Makefile sets each run's name, seed, folder and profile))
$(foreach s,$(SEEDS),$(if $(shell echo '$(s)' | grep -Ex '0|[1-9][0-9]*'),,$(error SEEDS: '$(s)' is not a seed (0, 1, 2, ... without leading zeros))))
CONTINUE = $(if $(RESTART),--restart,--resume)

# $(call rule,EXPERIMENT,SEED,ROOT,FLAGS): the run behind ROOT/EXPERIMENT/seed-SEED/metrics.json. The recipe
# checks that the run wrote its target.
define rule
$(3)/$(1)/seed-$(2)/metrics.json: $(if $(filter 08_finetune_svhn,$(1)),$(3)/07_reverse_mnist/seed-$(2)/metrics.json)
	$(RUN) $(1).py --seed $(2) --data-dir $(DATA) --results-dir $(R) $(4) $(FLAGS) $$(if $$(wildcard $$(@D).partial/checkpoint.pt),$$(CONTINUE))
	@test -f $$@ || { echo "error: $(1).py finished without writing $$@" >&2; exit 1; }
endef


QUICK := $(foreach e,$(EXPERIMENTS),$(R)/quick/$(e)/seed-0/metrics.json)
FULL  := $(foreach s,$(SEEDS),$(foreach e,$(EXPERIMENTS),$(R)/$(e)/seed-$(s)/metrics.json))
$(foreach e,$(EXPERIMENTS),$(eval $(call rule,$(e),0,$(R)/quick,--quick $(if $(filter 05_transfer,$(e)),$(if $(WEIGHTS),,--no-pretrained)))))
$(foreach s,$(SEEDS),$(foreach e,$(EXPERIMENTS),$(eval $(call rule,$(e),$(s),$(R),))))
# A finished metrics.json is never deleted by make, not even when an interrupt lands right after the run swapped
# it in (make deletes an interrupted target unless it is precious; a pattern here would not cover these targets).
.PRECIOUS: $(QUICK) $(FULL)

.PHONY: quick-study study report test-fast test
quick-study: $(QUICK)
	$(PY) -m common.report --results-dir $(R)
study: $(FULL)
	$(if $(strip $(SEEDS)),,$(error SEEDS is empty: nothing would train))
	$(PY) -m common.report --results-dir $(R)
report:
	$(PY) -m common.report --results-dir $(R)
test-fast:
	$(PY) -m pytest tests -q -m "not slow"
test:
	$(PY) -m pytest tests -q
