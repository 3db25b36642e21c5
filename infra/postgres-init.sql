-- A second database for the Prefect server, beside the pipeline's own.
CREATE DATABASE prefect OWNER erasure;
