"""The data layer: one module per data source, and the base types they share.

Dependencies point one way, from the chooser down to the base types:

    registry          picks the source named by --dataset (the only module that knows them all)
      nih, odir, csv_source, synthetic        one module per source
        pools         image-file pools, the validation carve, pre-flight + cache -> DataSplits
          tables, images, image_cache, preflight     shared reading helpers
            base      MultiLabelDataset, Box, DataSplits, DataError, Source (imports no reader)

Adding a source means adding one module that defines ``SOURCE = Source(...)`` and one line in
``registry.SOURCES``. This file imports nothing, so importing any module of the package never runs
the others.
"""
