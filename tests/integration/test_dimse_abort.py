"""An association that ends in the middle of a C-STORE data set leaves nothing behind."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.dicomfactory import bare, make_dataset

from .conftest import StockadeServer, raw_associate, recv_pdu


def _associate(port: int) -> socket.socket:
    return raw_associate(port, CTImageStorage, ExplicitVRLittleEndian, "ABORTSCU")


def _store_pdus(dataset: bytes, sop_uid: str) -> list[bytes]:
    """pynetdicom's encoding of one C-STORE-RQ into P-DATA-TF PDUs of 16 KiB at most."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 0
    primitive.DataSet = BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    encoded = []
    for primitive_pdu in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive_pdu)
        encoded.append(pdu.encode())
    return encoded


def _ended(server: StockadeServer) -> int:
    """Associations of ABORTSCU the server logged as ended before a release."""
    log = server.log_path.read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "from ABORTSCU" in line and " ended: " in line)


def _staged_objects(server: StockadeServer) -> list[str]:
    return [p.name for p in server.staging_tmp_files()]


def test_abort_inside_a_data_set_discards_the_partial_object(
    make_server: Callable[..., StockadeServer],
) -> None:
    server = make_server()
    server.start()
    ds = make_dataset(PixelData=bytes(200_000), Rows=200, Columns=500)
    data = bare(ds)
    pdus = _store_pdus(data, ds.SOPInstanceUID)
    assert len(pdus) > 4  # command, then several data set fragments

    for ending in ("abort", "close"):
        sock = _associate(server.port)
        for pdu in pdus[:3]:  # the command and the first fragments only
            sock.sendall(pdu)
        if ending == "abort":
            sock.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))
        sock.close()

    # The server ends each association on its own thread: wait (bounded) until it logged
    # the end of both, then nothing of theirs may remain.
    deadline = time.monotonic() + 20
    while _ended(server) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(server) == 2, server.log_path.read_text()[-2000:]
    assert _staged_objects(server) == []
    assert server.count() == 0

    # The same object sent in full afterwards is stored, and only it.
    sock = _associate(server.port)
    for pdu in pdus:
        sock.sendall(pdu)
    pdu_type, body = recv_pdu(sock)
    assert pdu_type == 0x04
    response = dcmread(BytesIO(body[6:]), force=True)  # one PDV: the command set
    assert response.CommandField == 0x8001 and response.Status == 0x0000
    sock.sendall(struct.pack(">BBLL", 0x05, 0, 4, 0))
    assert recv_pdu(sock)[0] == 0x06
    sock.close()
    assert [r.sop_uid for r in server.rows()] == [ds.SOPInstanceUID]
    assert _staged_objects(server) == []
    assert server.stop() == 0
