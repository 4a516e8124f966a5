"""What leaves the pipeline: versioned artifacts in the store (``store``) and the reports beside them
(``report``)."""
