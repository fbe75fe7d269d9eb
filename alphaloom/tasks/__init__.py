"""Pipeline stages, one subpackage each: plain functions plus thin Prefect task wrappers.

May import alphaloom.model; never alphaloom.flows.
"""
