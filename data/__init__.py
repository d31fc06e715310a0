"""The data layer: one module per data source, and the base types they share.

Dependencies point one way, from the chooser down to the base types:

    registry      maps --dataset to a source (the only module that knows them all)
    nih, odir, csv_source, synthetic         one module per source, each defining SOURCE
    pools         file pools, the validation carve, pre-flight + cache -> DataSplits
    tables, images, image_cache              label tables, image decoding, the image cache
    preflight     the checks that stop a run on bad input before training
    base          MultiLabelDataset, Box, DataSplits, DataError, Source (imports no reader)

A module imports only modules on lower lines (tests/test_layout.py checks it).
Adding a source means adding one module that defines ``SOURCE = Source(...)`` and one line in
``registry.SOURCES``. This file imports nothing, so importing one module of the package does not
load the others.
"""
