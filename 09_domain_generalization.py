"""09 · Domain generalization, SVHN -> the other digit domains, source-only and after test-time adaptation.

Question: 07 asks how far MNIST digits carry to SVHN; this asks the other direction with the same tools,
trained on SVHN (no image of another domain seen), tested on MNIST, MNIST-M and USPS when present.
Differs from 04 (its augmentation and label smoothing kept) in 07's domain-generalization choices
(inversion, Pro-RandConv), and in adapting to each target domain's unlabelled test set after the
source-only test (--tta bn,tent), each on its own copy of the model (metrics.json: test vs test_tta).
    python 09_domain_generalization.py [--prorandconv 0.75] [--tta bn] [--quick]
"""
from common import AUGMENT_04, Config, cli, launch
from common.experiment import adapt, finish, load_data, new_model, start, test, train

CONFIG = Config(
    name="09_domain_generalization",
    label_smoothing=0.1,  # 04's recipe ...
    **AUGMENT_04,
    invert=0.5,           # ... plus 07's: MNIST is light on dark; SVHN shows both polarities, unevenly
    prorandconv=0.75,     # new textures and colours on the same shapes; a quarter of the images stay clean
    tta="bn,tent",        # both adaptations, each on its own copy, reported beside the source-only number
)


def main(cfg):
    with start(cfg) as trial:
        data = load_data(trial)           # SVHN train/val; every present domain's test set
        model = new_model(trial, data)
        train(trial, model, data)         # the epoch is chosen on the SVHN validation split
        results = test(trial, model, data)  # source-only, on every domain
        results.update(adapt(trial, model, data))  # each target domain's unlabelled test set, on a copy
        finish(trial, model, data, results)


if __name__ == "__main__":
    launch(main, cli(CONFIG))
