# The study as files: each run's finished metrics.json is a target, so a finished run is skipped, an
# interrupted one resumed (--resume when its checkpoint exists), and 08 waits for 07 of its seed.
#   make quick-study DATA=../shared/data      every script's --quick run, then the report   (minutes, CPU)
#   make study SEEDS="0 1 2" DATA=data         every script on every seed, then the report    (a GPU box)
#   make -j4 study ...                         independent runs side by side
#   make study RUN="torchrun --nproc-per-node 4"   each run on 4 GPUs
#   make report | make test-fast | make test
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

# $(call rule,EXPERIMENT,SEED,ROOT,FLAGS): the run behind ROOT/EXPERIMENT/seed-SEED/metrics.json
define rule
$(3)/$(1)/seed-$(2)/metrics.json: $(if $(filter 08_finetune_svhn,$(1)),$(3)/07_reverse_mnist/seed-$(2)/metrics.json)
	$(RUN) $(1).py --seed $(2) --data-dir $(DATA) --results-dir $(R) $(4) $(FLAGS) $$(if $$(wildcard $$(@D).partial/checkpoint.pt),--resume)
endef

QUICK := $(foreach e,$(EXPERIMENTS),$(R)/quick/$(e)/seed-0/metrics.json)
FULL  := $(foreach s,$(SEEDS),$(foreach e,$(EXPERIMENTS),$(R)/$(e)/seed-$(s)/metrics.json))
$(foreach e,$(EXPERIMENTS),$(eval $(call rule,$(e),0,$(R)/quick,--quick $(if $(filter 05_transfer,$(e)),$(if $(WEIGHTS),,--no-pretrained)))))
$(foreach s,$(SEEDS),$(foreach e,$(EXPERIMENTS),$(eval $(call rule,$(e),$(s),$(R),))))

.PHONY: quick-study study report test-fast test
quick-study: $(QUICK)
	$(PY) -m common.report --results-dir $(R)
study: $(FULL)
	$(PY) -m common.report --results-dir $(R)
report:
	$(PY) -m common.report --results-dir $(R)
test-fast:
	$(PY) -m pytest tests -q -m "not slow"
test:
	$(PY) -m pytest tests -q
