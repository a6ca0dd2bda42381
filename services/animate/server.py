"""AnimateService, first part: avatars (CreateAvatar, GetAvatar, ListAvatars,
DeleteAvatar). Animate and Render are not implemented yet: they answer
UNIMPLEMENTED (grpc's default) until they are."""

from __future__ import annotations

import asyncio

from grpc import aio

from services.animate.avatars import AvatarRecord, AvatarStore
from services.animate.config import AnimateSettings
from services.animate.portrait import Check, PortraitAnalyzer, PortraitLimits
from services.common.errors import InvalidInput
from services.common.runtime import GrpcProgram, run_program
from talker.v1 import animate_pb2, animate_pb2_grpc

SEVERITIES = {
    "info": animate_pb2.CHECK_SEVERITY_INFO,
    "warning": animate_pb2.CHECK_SEVERITY_WARNING,
    "error": animate_pb2.CHECK_SEVERITY_ERROR,
}


class AnimateEngine:
    """What the avatars RPCs need, loaded once."""

    def __init__(self, settings: AnimateSettings) -> None:
        self.settings = settings
        self.store = AvatarStore(settings.avatars_dir)
        self.analyzer: PortraitAnalyzer | None = None

    def load(self) -> None:
        limits = PortraitLimits(
            max_yaw_deg=self.settings.max_yaw_deg,
            min_side_px=self.settings.min_side_px,
            min_face_px=self.settings.min_face_px,
            max_pixels=self.settings.max_pixels,
        )
        self.analyzer = PortraitAnalyzer(limits)
        self.store.load()


class AnimateServicer(animate_pb2_grpc.AnimateServiceServicer):
    def __init__(self, engine: AnimateEngine) -> None:
        self.engine = engine

    async def CreateAvatar(
        self, request: animate_pb2.CreateAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.CreateAvatarResponse:
        analyzer = self.engine.analyzer
        assert analyzer is not None
        display_name = request.display_name.strip() or "portrait"
        if len(display_name) > 80:
            raise InvalidInput("display_name must be at most 80 characters.")
        rgb = await asyncio.to_thread(analyzer.decode, request.image)
        report = await asyncio.to_thread(analyzer.analyze, rgb)
        if request.validate_only:
            return animate_pb2.CreateAvatarResponse(
                avatar=animate_pb2.Avatar(
                    display_name=display_name,
                    width=report.width,
                    height=report.height,
                    checks=[check_message(c) for c in report.checks],
                    face_box=box_message(report.face_box),
                )
            )
        if not report.acceptable:
            reasons = " ".join(f"({i}) {p}" for i, p in enumerate(report.problems, start=1))
            raise InvalidInput(f"The portrait cannot be used: {reasons}")
        record = await asyncio.to_thread(self.engine.store.add, rgb, display_name, report)
        return animate_pb2.CreateAvatarResponse(avatar=avatar_message(record))

    async def GetAvatar(
        self, request: animate_pb2.GetAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.GetAvatarResponse:
        return animate_pb2.GetAvatarResponse(
            avatar=avatar_message(self.engine.store.get(request.avatar_id))
        )

    async def ListAvatars(
        self, request: animate_pb2.ListAvatarsRequest, context: aio.ServicerContext
    ) -> animate_pb2.ListAvatarsResponse:
        return animate_pb2.ListAvatarsResponse(
            avatars=[avatar_message(r) for r in self.engine.store.all()]
        )

    async def DeleteAvatar(
        self, request: animate_pb2.DeleteAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.DeleteAvatarResponse:
        await asyncio.to_thread(self.engine.store.delete, request.avatar_id)
        return animate_pb2.DeleteAvatarResponse()


def check_message(check: Check) -> animate_pb2.PortraitCheck:
    return animate_pb2.PortraitCheck(
        name=check.name,
        passed=check.passed,
        severity=SEVERITIES[check.severity],
        message=check.message,
        measured_value=check.measured,
        threshold=check.threshold,
        unit=check.unit,
    )


def box_message(box: tuple[int, int, int, int] | None) -> animate_pb2.BoundingBox | None:
    if box is None:
        return None
    x, y, w, h = box
    return animate_pb2.BoundingBox(x=x, y=y, width=w, height=h)


def avatar_message(record: AvatarRecord) -> animate_pb2.Avatar:
    avatar = animate_pb2.Avatar(
        avatar_id=record.avatar_id,
        display_name=record.display_name,
        width=record.width,
        height=record.height,
        checks=[check_message(c) for c in record.check_objects()],
        face_box=box_message(tuple(record.face_box)),  # type: ignore[arg-type]
    )
    avatar.create_time.FromNanoseconds(int(record.created * 1e9))
    return avatar


def build_program(settings: AnimateSettings) -> GrpcProgram:
    engine = AnimateEngine(settings)
    servicer = AnimateServicer(engine)
    return GrpcProgram(
        settings,
        [animate_pb2.DESCRIPTOR.services_by_name["AnimateService"].full_name],
        lambda server: animate_pb2_grpc.add_AnimateServiceServicer_to_server(servicer, server),
        engine.load,
        engine,
    )


def main(argv: list[str] | None = None) -> None:
    run_program(AnimateSettings, build_program, argv)


if __name__ == "__main__":
    main()
