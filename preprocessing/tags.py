"""The DICOM attributes the intake reads, named once, by pydicom's keywords.

`Tag(keyword)` looks each one up in pydicom's data dictionary, so a typo fails at
import rather than reading the wrong element. Every module imports its tags from here.
"""

from __future__ import annotations

from pydicom.tag import BaseTag, Tag


def _tag(keyword: str) -> BaseTag:
    return Tag(keyword)


# Identity and timing
SOP_CLASS_UID = _tag("SOPClassUID")
SOP_INSTANCE_UID = _tag("SOPInstanceUID")
MODALITY = _tag("Modality")
ACQUISITION_TIME = _tag("AcquisitionTime")
CONTENT_TIME = _tag("ContentTime")
MAGNETIC_FIELD_STRENGTH = _tag("MagneticFieldStrength")

# Image pixel module
SAMPLES_PER_PIXEL = _tag("SamplesPerPixel")
PHOTOMETRIC_INTERPRETATION = _tag("PhotometricInterpretation")
NUMBER_OF_FRAMES = _tag("NumberOfFrames")
ROWS = _tag("Rows")
COLUMNS = _tag("Columns")
BITS_ALLOCATED = _tag("BitsAllocated")
BITS_STORED = _tag("BitsStored")
PIXEL_REPRESENTATION = _tag("PixelRepresentation")
PIXEL_DATA = _tag("PixelData")
FLOAT_PIXEL_DATA = _tag("FloatPixelData")
DOUBLE_FLOAT_PIXEL_DATA = _tag("DoubleFloatPixelData")

# Modality LUT: top level, or the enhanced objects' Pixel Value Transformation macro
RESCALE_INTERCEPT = _tag("RescaleIntercept")
RESCALE_SLOPE = _tag("RescaleSlope")
MODALITY_LUT_SEQUENCE = _tag("ModalityLUTSequence")
PIXEL_VALUE_TRANSFORMATION = _tag("PixelValueTransformationSequence")

# Geometry, top level and in the enhanced objects' functional groups
PIXEL_SPACING = _tag("PixelSpacing")
IMAGE_POSITION_PATIENT = _tag("ImagePositionPatient")
IMAGE_ORIENTATION_PATIENT = _tag("ImageOrientationPatient")
SHARED_FUNCTIONAL_GROUPS = _tag("SharedFunctionalGroupsSequence")
PER_FRAME_FUNCTIONAL_GROUPS = _tag("PerFrameFunctionalGroupsSequence")
PIXEL_MEASURES = _tag("PixelMeasuresSequence")
PLANE_POSITION = _tag("PlanePositionSequence")
PLANE_ORIENTATION = _tag("PlaneOrientationSequence")
